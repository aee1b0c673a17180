"""The one table of `benchmarks/gpu_check.sh`: its steps' exit codes, the counts of the tests
marked ``cuda`` (from pytest's JUnit XML) and the GPU bench's numbers (throughput.py's JSON).

    python benchmarks/gpu_table.py --gpu-csv G.csv --junit cuda.xml --bench bench.json \
        --step pytest=0 --step bench=0

Whatever is missing (a step that timed out, a file never written) is said in its row; the table
is printed all the same. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import xml.etree.ElementTree as ET
from pathlib import Path


def step_result(rc: int | None) -> str:
    if rc is None:
        return "not run"
    if rc == 0:
        return "ok"
    return f"FAIL (exit {rc}, timed out)" if rc in (124, 137) else f"FAIL (exit {rc})"


def gpu_row(path: Path) -> str:
    """'name, memory' from `nvidia-smi --query-gpu=name,memory.total --format=csv`."""
    if not path.is_file():
        return "no nvidia-smi output"
    lines = [x.strip() for x in path.read_text().splitlines() if x.strip()]
    if not lines or not lines[0].startswith("name"):  # not the CSV: nvidia-smi's error, if any
        return "no GPU listed" + (f" ({lines[0]})" if lines else "")
    return "; ".join(lines[1:]) or "no GPU listed"


def junit_counts(path: Path) -> str:
    """'P passed, F failed, S skipped' from a pytest JUnit XML (failed = failures + errors)."""
    if not path.is_file():
        return "no JUnit report"
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    total = failed = skipped = 0
    for s in suites:
        total += int(s.get("tests", 0))
        failed += int(s.get("failures", 0)) + int(s.get("errors", 0))
        skipped += int(s.get("skipped", 0))
    return f"{total - failed - skipped} passed, {failed} failed, {skipped} skipped"


def pair(table: dict, key: str, unit: str = "") -> str:
    """'lorasum vs baseline (ratio)' for a row of throughput.py's table."""
    row = table.get(key)
    if not row or row.get("lorasum") is None or row.get("baseline") is None:
        return "not measured"
    s, b = row["lorasum"], row["baseline"]
    ratio = f" ({s / b:.2f}x)" if b else ""
    return f"{s:.0f} vs {b:.0f}{unit}{ratio}"


def build(gpu_csv: Path, junit: Path, bench: Path, steps: dict[str, int | None]) -> str:
    rows = [("GPU", gpu_row(gpu_csv))]
    rows.append(("step: tests marked cuda", step_result(steps.get("pytest"))))
    rows.append(("tests marked cuda", junit_counts(junit)))
    rows.append(("step: bench (throughput.py --device cuda)", step_result(steps.get("bench"))))
    if bench.is_file():
        b = json.loads(bench.read_text())
        t = b.get("table", {})
        rows += [
            ("bench device", str(b.get("device", "?"))),
            ("lorasum precision", str(b.get("lorasum_precision", "?"))),
            ("train tokens/s: lorasum vs baseline", pair(t, "train_tokens_per_s")),
            ("eval tokens/s: lorasum vs baseline", pair(t, "eval_tokens_per_s")),
            ("train peak GPU MiB: lorasum vs baseline", pair(t, "train_peak_gpu_mb")),
            ("eval peak GPU MiB: lorasum vs baseline", pair(t, "eval_peak_gpu_mb")),
            ("bench wall time", f"{b['wall_s']:.0f} s" if "wall_s" in b else "?"),
        ]
    else:
        rows.append(("bench numbers", "no bench results"))
    for name, rc in steps.items():
        if name not in ("pytest", "bench"):
            rows.append((f"step: {name}", step_result(rc)))
    lines = ["| check | result |", "| --- | --- |"]
    lines += [f"| {k} | {v.replace('|', '/')} |" for k, v in rows]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpu-csv", type=Path, required=True)
    p.add_argument("--junit", type=Path, required=True)
    p.add_argument("--bench", type=Path, required=True)
    p.add_argument("--step", action="append", default=[], help="NAME=EXIT_CODE (repeatable)")
    a = p.parse_args()
    steps: dict[str, int | None] = {}
    for s in a.step:
        name, _, rc = s.partition("=")
        steps[name] = int(rc) if rc.lstrip("-").isdigit() else None
    print(build(a.gpu_csv, a.junit, a.bench, steps))


if __name__ == "__main__":
    main()
