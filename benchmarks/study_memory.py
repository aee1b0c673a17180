"""Peak memory of every process of a study: runs ``lorasum reproduce ARGS`` and samples the RSS
of its whole process tree (driver, worker processes, Ray's when used) every ``--interval``
seconds with psutil. Prints one row per process (peak RSS, when, its role) and the tree's peak
total, and writes JSON (default: benchmarks/results/study_memory.json). Not a test: the numbers
depend on the machine and the load; the limit is the [perf] item "every process ≤ 6 GB".

    .venv/bin/python benchmarks/study_memory.py -- --preset tiny --out runs/mem-tiny
    .venv/bin/python benchmarks/study_memory.py --limit-gb 6 -- --preset standard --out runs/std

Sampling misses a peak shorter than the interval; each process's own ``ru_maxrss`` is not
reachable from outside, so the interval is short (0.2 s) and the sampler costs < 1 % of a core.
The study's log (``<out>/study.log``) tells which unit ran at a given time.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


def role(cmdline: list[str]) -> str:
    """A short name for a process of the tree, from its command line."""
    text = " ".join(cmdline)
    if "reproduce" in text:
        return "driver"
    if "multiprocessing" in text or "spawn_main" in text:
        return "worker"
    if "ray" in text.lower():
        return "ray"
    return Path(cmdline[0]).name if cmdline else "?"


def sample(proc: psutil.Process) -> dict[int, tuple[float, list[str]]]:
    """RSS (MB) and command line of the process and all its descendants, now."""
    out = {}
    try:
        tree = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return out
    for p in tree:
        try:
            out[p.pid] = (p.memory_info().rss / 2**20, p.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return out


def watch(cmd: list[str], interval: float) -> dict:
    """Run ``cmd`` and record each process's peak RSS and the tree's peak total."""
    start = time.monotonic()
    child = subprocess.Popen(cmd, cwd=ROOT)
    proc = psutil.Process(child.pid)
    peaks: dict[int, dict] = {}
    total_peak, total_at = 0.0, 0.0
    while child.poll() is None:
        now = time.monotonic() - start
        seen = sample(proc)
        total = sum(rss for rss, _ in seen.values())
        if total > total_peak:
            total_peak, total_at = total, now
        for pid, (rss, cmdline) in seen.items():
            row = peaks.setdefault(
                pid, {"pid": pid, "role": role(cmdline), "peak_mb": 0.0, "first_s": now}
            )
            if rss > row["peak_mb"]:
                row["peak_mb"], row["peak_at_s"] = rss, now
            row["last_s"] = now
        time.sleep(interval)
    return {
        "returncode": child.returncode,
        "wall_s": time.monotonic() - start,
        "tree_peak_mb": total_peak,
        "tree_peak_at_s": total_at,
        "processes": sorted(peaks.values(), key=lambda r: -r["peak_mb"]),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--interval", type=float, default=0.2, help="seconds between samples")
    ap.add_argument("--limit-gb", type=float, default=6.0, help="per-process limit to check")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks/results/study_memory.json")
    ap.add_argument("args", nargs=argparse.REMAINDER, help="-- then `lorasum reproduce`'s flags")
    a = ap.parse_args()
    args = a.args[1:] if a.args[:1] == ["--"] else a.args
    cmd = [sys.executable, "-m", "lorasum.cli", "reproduce", *args]
    result = watch(cmd, a.interval)
    result.update(
        command=args,
        cpu=platform.processor() or platform.machine(),
        cores=psutil.cpu_count(),
        limit_mb=a.limit_gb * 1024,
    )
    print(f"\n{'pid':>8} {'role':<8} {'peak RSS MB':>12} {'at s':>8} {'lived s':>8}")
    for r in result["processes"]:
        if r["peak_mb"] < 50:
            continue  # shells, pipes
        lived = r["last_s"] - r["first_s"]
        print(
            f"{r['pid']:>8} {r['role']:<8} {r['peak_mb']:>12.0f} {r['peak_at_s']:>8.0f} "
            f"{lived:>8.0f}"
        )
    worst = max((r["peak_mb"] for r in result["processes"]), default=0.0)
    print(
        f"tree peak {result['tree_peak_mb']:.0f} MB at {result['tree_peak_at_s']:.0f} s; "
        f"largest process {worst:.0f} MB (limit {a.limit_gb:g} GB); "
        f"wall {result['wall_s']:.0f} s; exit {result['returncode']}"
    )
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(result, indent=1))
    if result["returncode"] != 0:
        return result["returncode"]
    return 1 if worst > a.limit_gb * 1024 else 0


if __name__ == "__main__":
    sys.exit(main())
