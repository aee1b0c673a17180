"""The GPU paths against their oracles: bf16 autocast training against fp32 on the same batches
(and fp32 on the GPU against the CPU), evaluation on the GPU against the CPU, and a study run by
worker processes that each own a GPU against the same study run inline.

Tests marked ``cuda`` are skipped where torch sees no GPU (tests/conftest.py) and run on one by
`bash benchmarks/gpu_check.sh`. The tests not marked check that script and its table on a CPU.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_adapter

from lorasum.evaluate import evaluate
from lorasum.study.reproduce import reproduce
from lorasum.training import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


def _train_log(model: Path, data: list[Path], out: Path, precision: str, device: str):
    """Eight steps of one training; its per-step log rows and its marker's metrics."""
    cfg = TrainConfig(
        model=str(model),
        data=[str(d) for d in data],
        max_steps=8,
        lr=3e-3,
        batch_size=8,
        max_length=32,
        dropout=0.0,  # no random stream: the runs differ in precision or device alone
        eval_val=False,
        warmup_steps=0,
        precision=precision,
        device=device,
    )
    marker = train(cfg, out, progress=False)
    rows = [json.loads(line) for line in (out / "train_log.jsonl").open()]
    return rows, marker["metrics"]


@pytest.mark.cuda
def test_bf16_training_on_the_gpu_follows_fp32_on_the_same_batches(tiny_llama, qa_files, tmp_path):
    data = [qa_files["arith"], qa_files["colors"]]
    cpu, m_cpu = _train_log(tiny_llama, data, tmp_path / "cpu-fp32", "fp32", "cpu")
    fp32, m_fp32 = _train_log(tiny_llama, data, tmp_path / "gpu-fp32", "fp32", "cuda")
    bf16, m_bf16 = _train_log(tiny_llama, data, tmp_path / "gpu-bf16", "bf16", "cuda")
    assert m_cpu["device"] == "cpu"
    assert m_fp32["device"].startswith("cuda") and m_bf16["device"].startswith("cuda")
    assert (m_fp32["precision"], m_bf16["precision"]) == ("fp32", "bf16")
    assert len(cpu) == len(fp32) == len(bf16) == 8
    # the same batches, step by step
    tokens = [r["real_tokens"] for r in cpu]
    assert [r["real_tokens"] for r in fp32] == tokens == [r["real_tokens"] for r in bf16]
    loss_cpu, loss_fp32, loss_bf16 = ([r["loss"] for r in rows] for rows in (cpu, fp32, bf16))
    assert all(math.isfinite(x) for x in loss_fp32 + loss_bf16)
    assert loss_fp32 == pytest.approx(loss_cpu, rel=2e-3)  # fp32 on the GPU: the CPU's numbers
    assert loss_bf16 == pytest.approx(loss_fp32, rel=1e-2)  # bf16: close to fp32 ...
    assert loss_bf16 != loss_fp32  # ... and really bf16
    assert loss_bf16[-1] < loss_bf16[0]  # and it learns


@pytest.mark.cuda
def test_evaluation_on_the_gpu_equals_the_cpu(tiny_model, qa_files, tmp_path):
    adapter = make_adapter(tiny_model, tmp_path / "adapter")  # random, non-zero A and B
    kw = dict(
        model=str(tiny_model),
        data=[str(p) for p in qa_files.values()],
        adapter=str(adapter),
        max_length=32,
        batch_size=8,
        progress=False,
    )
    cpu = evaluate(precision="fp32", device="cpu", **kw)
    gpu = evaluate(precision="fp32", device="cuda", **kw)
    assert gpu["tokens"] == cpu["tokens"] > 0
    assert gpu["perplexity"] == pytest.approx(cpu["perplexity"], rel=1e-4)
    for name, row in cpu["per_dataset"].items():
        assert gpu["per_dataset"][name]["tokens"] == row["tokens"]
        assert gpu["per_dataset"][name]["nll"] == pytest.approx(row["nll"], rel=1e-4)
    bf16 = evaluate(precision="bf16", device="cuda", **kw)
    assert bf16["tokens"] == cpu["tokens"]
    assert bf16["perplexity"] == pytest.approx(cpu["perplexity"], rel=2e-2)
    assert bf16["perplexity"] != gpu["perplexity"]  # bf16 really ran


def _numbers(results: dict) -> list[float]:
    return [
        v
        for row in results["combinations"]
        for v in (row["ppl_sum"], row["ppl_merged"], row["rms_cosine"])
    ] + [s["perplexity"] for s in results["singles"].values()]


@pytest.mark.cuda
def test_a_study_with_one_worker_per_gpu_equals_the_study_inline(tiny_llama, qa_files, tmp_path):
    """``workers`` processes, one per GPU (on a single GPU two workers share it): the numbers of
    one inline process, and each GPU trains some of the adapters."""
    gpus = torch.cuda.device_count()
    workers = max(2, gpus)
    kw = dict(
        preset="tiny",
        model=str(tiny_llama),
        domains=[f"{n}={p}" for n, p in qa_files.items()],
        device="cuda",
        precision="fp32",
        progress=False,
    )
    inline = reproduce(tmp_path / "inline", workers=1, **kw)
    pooled = reproduce(tmp_path / "pooled", workers=workers, **kw)
    assert _numbers(pooled) == pytest.approx(_numbers(inline), rel=1e-3)
    markers = list((tmp_path / "pooled" / "seed-42" / "adapters").glob("*/lorasum.json"))
    devices = {json.loads(p.read_text())["metrics"]["device"] for p in markers}
    assert devices == {f"cuda:{i}" for i in range(min(gpus, len(markers)))}


@pytest.mark.cuda
def test_every_gpu_takes_a_worker():
    """Needs two GPUs: worker i of a pool per GPU gets GPU i, and more workers share them."""
    from lorasum.study.executors import _worker_device

    gpus = torch.cuda.device_count()
    if gpus < 2:
        pytest.skip(f"needs 2 or more CUDA GPUs, found {gpus}")
    cuda = torch.device("cuda")
    assert [_worker_device(cuda, i) for i in range(gpus)] == [f"cuda:{i}" for i in range(gpus)]
    assert _worker_device(cuda, gpus) == "cuda:0"


def test_workers_beyond_the_gpus_share_them(monkeypatch):
    from lorasum.study.executors import _worker_device

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    cuda = torch.device("cuda")
    assert [_worker_device(cuda, i) for i in range(5)] == [f"cuda:{i % 2}" for i in range(5)]
    assert _worker_device(torch.device("cpu"), 3) == "cpu"


def test_gpu_check_script_is_bash_with_timeouts_that_installs_nothing():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    text = SCRIPT.read_text()
    assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text
    assert int(re.search(r"GPU_CHECK_BUDGET_S:-(\d+)", text).group(1)) <= 8 * 60
    assert 'timeout --kill-after=10 "$cap" "$@"' in text  # `step` runs each command so
    steps = dict(re.findall(r"\bstep ([\w-]+) (\d+) ", text))
    assert {"install", "nvidia-smi", "torch-cuda", "pytest", "assets", "bench"} <= set(steps)
    assert re.search(r"step pytest \d+ .*-m pytest -m cuda", text)
    assert re.search(r"step bench \d+ .*benchmarks/throughput.py --device cuda", text)
    commands = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    assert not any(re.search(r"\bpip3?\b", line) for line in commands)  # make install at most


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the script runs the whole check")
def test_gpu_check_without_a_gpu_fails_and_still_prints_its_table(tmp_path):
    env = {**os.environ, "LORASUM_PYTHON": sys.executable, "GPU_CHECK_OUT": str(tmp_path)}
    proc = subprocess.run(
        ["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout.startswith("| check | result |\n| --- | --- |\n")
    assert "| step: torch-cuda | FAIL (exit 1) |" in proc.stdout
    assert "| step: tests marked cuda | not run |" in proc.stdout
    assert "no bench results" in proc.stdout
    assert (tmp_path / "table.md").read_text() == proc.stdout
    assert "no CUDA GPU" in (tmp_path / "torch-cuda.log").read_text()


def _table(tmp_path: Path, bench: dict | None, junit: str | None, steps: list[str]) -> str:
    args = [sys.executable, str(REPO / "benchmarks" / "gpu_table.py")]
    gpu = tmp_path / "gpu.csv"
    gpu.write_text("name, memory.total [MiB]\nNVIDIA H100 80GB HBM3, 81559 MiB\n")
    args += ["--gpu-csv", str(gpu)]
    if bench is not None:
        (tmp_path / "bench.json").write_text(json.dumps(bench))
    if junit is not None:
        (tmp_path / "cuda.xml").write_text(junit)
    args += ["--bench", str(tmp_path / "bench.json"), "--junit", str(tmp_path / "cuda.xml")]
    for s in steps:
        args += ["--step", s]
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="1"
failures="1" skipped="1" tests="6"><testcase name="a"/></testsuite></testsuites>"""


def test_gpu_table_reads_the_bench_and_the_test_counts(tmp_path):
    bench = {
        "device": "NVIDIA H100 80GB HBM3",
        "lorasum_precision": "bfloat16",
        "table": {
            "train_tokens_per_s": {"baseline": 1000.0, "lorasum": 2500.0},
            "eval_tokens_per_s": {"baseline": 4000.0, "lorasum": 5000.0},
            "train_peak_gpu_mb": {"baseline": 3000.0, "lorasum": 2000.0},
            "eval_peak_gpu_mb": {"baseline": 1500.0, "lorasum": 1200.0},
        },
        "wall_s": 123.4,
    }
    out = _table(tmp_path, bench, JUNIT, ["pytest=1", "bench=0"])
    lines = out.strip().splitlines()
    assert lines[0].startswith("| check |") and set(lines[1]) <= {"|", " ", "-"}
    assert all(line.startswith("|") and line.endswith("|") for line in lines)
    assert "NVIDIA H100 80GB HBM3, 81559 MiB" in out
    assert "3 passed, 2 failed, 1 skipped" in out  # 6 tests: 1 failure + 1 error, 1 skipped
    assert "2500 vs 1000 (2.50x)" in out and "5000 vs 4000 (1.25x)" in out
    assert "2000 vs 3000" in out and "1200 vs 1500" in out
    assert "FAIL (exit 1)" in out and "bfloat16" in out


def test_gpu_table_says_what_is_missing(tmp_path):
    out = _table(tmp_path, None, None, ["pytest=124", "bench=2"])
    assert "no JUnit report" in out and "no bench results" in out
    assert "FAIL (exit 124, timed out)" in out and "FAIL (exit 2)" in out


def _fake_side(name: str, a) -> dict:
    """A side's result with the keys throughput.py reads (numbers made up, GPU keys included)."""
    if name == "peak":
        return {
            "threads": 1,
            "body_linear_params": 10,
            "head_params": 2,
            "linear_gflops": 50.0,
            "linear_gflops_bf16": 400.0,
        }
    if name == "score":
        return {"answer_ppl": 3.0, "full_sequence_ppl": 4.0}
    lorasum = name.endswith("lorasum")
    return {
        "s_per_step": 0.5,
        "seconds": 1.0,
        "tokens_per_s": 2500.0 if lorasum else 1000.0,
        "tokens_per_s_median_step": 2400.0 if lorasum else 1000.0,
        "real_tokens": 100,
        "positions": 120,
        "head_positions": 30 if lorasum else 120,
        "peak_rss_mb": 900.0,
        "peak_gpu_mb": 2000.0 if lorasum else 3000.0,
        "precision": "bfloat16",
    }


def test_the_gpu_bench_json_feeds_the_gpu_table(tmp_path, monkeypatch):
    """throughput.py --device cuda on made-up sides (no GPU needed): the peak GPU memory rows,
    no two-processes run, and gpu_table.py reads what it wrote."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import throughput
    finally:
        sys.path.pop(0)
    called = []

    def fake_run_side(name, a, **kw):
        called.append(name)
        return _fake_side(name, a)

    def no_parallel(*a, **kw):
        pytest.fail("two training processes on one GPU")

    monkeypatch.setattr(throughput, "run_side", fake_run_side)
    monkeypatch.setattr(throughput, "run_side_parallel", no_parallel)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    out = tmp_path / "bench.json"
    argv = ["throughput.py", "--device", "cuda", "--repeats", "1", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    throughput.main()
    assert called.count("peak") == 1  # the 1-thread peak is a CPU matter
    result = json.loads(out.read_text())
    assert result["device"] == "Fake GPU" and "train_two_processes" not in result
    gpu_mb = result["table"]["train_peak_gpu_mb"]
    assert (gpu_mb["baseline"], gpu_mb["lorasum"]) == (3000.0, 2000.0)
    table = _table(tmp_path, result, JUNIT, ["pytest=0", "bench=0"])
    assert "| bench device | Fake GPU |" in table
    assert "2500 vs 1000 (2.50x)" in table and "2000 vs 3000 (0.67x)" in table


def test_the_cpu_bench_shares_are_of_the_best_peak_reading(tmp_path, monkeypatch):
    """throughput.py on a CPU reads the matmul peak before every repeat's train and eval sides
    and at the end: the headline share is of the best reading (a slow reading never flatters
    it), and each side's share of the reading taken just before it is reported beside it."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import throughput
    finally:
        sys.path.pop(0)
    readings = iter([40.0, 100.0, 50.0, 25.0, 80.0, 50.0])  # train 1, 2; eval 1, 2; end; 1 thread
    called = []

    def fake_run_side(name, a, **kw):
        called.append(name)
        side = _fake_side(name, a)
        if name == "peak":
            side = {k: v for k, v in side.items() if k != "linear_gflops_bf16"}
            side["linear_gflops"] = next(readings)
        return side

    def fake_parallel(name, a, copies, **kw):
        return [_fake_side(name, a) for _ in range(copies)]

    def fake_ddp(name, a, ranks, **kw):
        called.append(f"ddp-{ranks}")
        return {**_fake_side(name, a), "tokens_per_s": 2800.0}  # one training, two ranks

    monkeypatch.setattr(throughput, "run_side", fake_run_side)
    monkeypatch.setattr(throughput, "run_side_parallel", fake_parallel)
    monkeypatch.setattr(throughput, "run_side_ddp", fake_ddp)
    monkeypatch.setattr(throughput, "_bf16_pays", lambda gpu: False)
    out = tmp_path / "bench.json"
    argv = ["throughput.py", "--repeats", "2", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    throughput.main()
    assert called.count("peak") == 6 and called.count("ddp-2") == 2
    roof = json.loads(out.read_text())["roofline"]
    assert roof["linear_gflops_peak"] == 100.0 and roof["linear_gflops_peak_1_thread"] == 50.0
    assert roof["linear_gflops_peak_readings"] == [40.0, 100.0, 50.0, 25.0, 80.0]
    # lorasum: 2500 real tokens/s, 120 positions and 30 head positions per 100 real tokens,
    # body 10 and head 2 parameters: (4 * (10 * 120 + 2 * 30)) / 100 = 50.4 FLOP per token
    train = roof["train"]
    rate = 2500 * 50.4 / 1e9
    assert train["lorasum_gflops"] == pytest.approx(rate)
    assert train["lorasum_fraction_of_peak"] == pytest.approx(rate / 100.0)
    assert train["lorasum_fraction_of_adjacent_peak"] == pytest.approx((rate / 40 + rate / 100) / 2)
    two = json.loads(out.read_text())["train_two_processes"]  # two fake processes of 2500
    assert two["tokens_per_s"] == 5000
    assert two["fraction_of_peak"] == pytest.approx(5000 * 50.4 / 1e9 / 100.0)
    ddp = json.loads(out.read_text())["train_torchrun_2"]
    assert ddp["vs_one_process"] == pytest.approx(2800 / 2500)
    assert ddp["fraction_of_peak"] == pytest.approx(2800 * 50.4 / 1e9 / 100.0)
    ev = roof["eval"]
    assert ev["lorasum_fraction_of_adjacent_peak"] == pytest.approx(
        (ev["lorasum_gflops"] / 50 + ev["lorasum_gflops"] / 25) / 2
    )


def test_train_rate_is_tokens_over_time_of_the_timed_steps():
    """Steps of unequal size (lorasum's length-grouped batches): the rate is the real tokens of
    the steps after the first over their time, taken as the median seconds per position times
    their positions; FLOPs per real token times that rate is those steps' FLOPs over that time.
    With equal steps (the baseline) it is the median step's rate, as before."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import throughput
    finally:
        sys.path.pop(0)
    seconds, real = [9.0, 4.0, 1.8, 4.4], [700, 1000, 300, 1000]
    positions, head = [1024, 1024, 384, 1024], [300, 400, 100, 400]
    r = throughput._train_result(seconds, 1.0, real, positions, head)
    per_position = 4.4 / 1024  # the median of 4.0/1024, 4.4/1024 and 1.8/384
    assert r["tokens_per_s"] == pytest.approx(2300 / (per_position * 2432))
    assert r["tokens_per_s_summed"] == pytest.approx(2300 / 10.2)
    assert r["tokens_per_s_median_step"] == pytest.approx(3000 / 4 / 4.0)  # the earlier measure
    assert (r["real_tokens"], r["positions"], r["head_positions"], r["timed_steps"]) == (
        2300,
        2432,
        900,
        3,
    )
    peak = {"body_linear_params": 10, "head_params": 2, "linear_gflops": 1.0}
    runs = {f"{k}-{s}": [r] for k in ("train", "eval") for s in ("baseline", "lorasum")}
    roof = throughput._roofline(runs, peak, peak)
    flops = sum(4 * (10 * p + 2 * h) for p, h in zip(positions[1:], head[1:], strict=True))
    assert roof["train"]["lorasum_gflops"] == pytest.approx(flops / (per_position * 2432) / 1e9)
    equal = throughput._train_result([9.0, 4.0, 5.0, 4.4], 1.0, real, [1024] * 4, [1024] * 4)
    assert equal["tokens_per_s"] == pytest.approx(2300 / 3 / 4.4)
    with pytest.raises(ValueError, match="per step"):
        throughput._train_result(seconds, 1.0, real[:2], positions, head)
