"""One adapter on several processes: torchrun (DDP, gloo) equals one process at the same
global --batch-size, and the row shares cover every global batch exactly once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import rel_tol, run_precision
from safetensors.torch import load_file

import lorasum
from lorasum.errors import LorasumError
from lorasum.training.distributed import World, rank_rows, world_from_env


@pytest.mark.parametrize("n", [0, 1, 2, 3, 7, 8, 9])
@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_rank_rows_partition_the_batch(n, size):
    group = list(range(100, 100 + n))
    shares = [rank_rows(group, rank, size) for rank in range(size)]
    assert [i for share in shares for i in share] == group  # in order, each row once
    lengths = [len(s) for s in shares]
    assert max(lengths) - min(lengths) <= 1
    assert lengths == sorted(lengths, reverse=True)  # the spare rows go to the first ranks


def test_world_from_env():
    assert world_from_env({}) == World()
    w = world_from_env({"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "0"})
    assert (w.rank, w.size, w.local_rank, w.distributed, w.is_main) == (2, 4, 0, True, False)
    assert not world_from_env({"WORLD_SIZE": "1", "RANK": "0"}).distributed
    with pytest.raises(LorasumError):
        world_from_env({"WORLD_SIZE": "2", "RANK": "2"})
    with pytest.raises(LorasumError):
        world_from_env({"WORLD_SIZE": "two"})


# bf16 bounds: measured on a 2-core AVX512-BF16 EPYC (2026-12-07) as 6.5e-2 (weights, of the
# tensor's scale), 1.4e-4 (loss) and 1.2e-3 (gradient norm), each bound ~2-7x that. Adam
# divides each update by its gradient's running size, so an entry near zero that rounds the
# other way moves a full step: in bf16 the weights are a weak check, the loss and norm are not.
BF16_WEIGHTS = 0.15
BF16_LOSS = 1e-3
BF16_GRAD_NORM = 5e-3


def _train_args(model: Path, data: Path, out: Path) -> list[str]:
    # 7 training rows, global batch 3: batches of 3, 3 and 1 rows; on 2 ranks the 3-row
    # batches split 2 + 1 and in the 1-row batch rank 1 has no row (it joins with a stand-in).
    return [
        "-m", "lorasum.cli", "train", "--out", str(out), "--model", str(model),
        "--data", str(data), "--max-train", "7", "--batch-size", "3", "--epochs", "2",
        "--dropout", "0", "--lr", "0.01", "--warmup-steps", "1", "--grad-clip", "0.5",
        "--rank", "2", "--alpha", "8", "--precision", run_precision(), "--device", "cpu",
        "--max-length", "48", "--no-eval-val",
    ]  # fmt: skip


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(lorasum.__file__).parents[1]),
        "OMP_NUM_THREADS": "1",
    }
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.precision
def test_torchrun_two_ranks_equal_one_process(tiny_llama, qa_files, tmp_path):
    single, multi = tmp_path / "single", tmp_path / "ddp"
    data = qa_files["arith"]
    _run([sys.executable, *_train_args(tiny_llama, data, single)])
    launch = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
    ]
    proc = _run([*launch, *_train_args(tiny_llama, data, multi)])
    assert proc.stdout.count("adapter written to") == 1  # rank 0 speaks, rank 1 is silent

    # Only one adapter directory, written once by rank 0 (no temp or per-rank leftovers).
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp", "single"]
    one, two = (json.loads((d / "lorasum.json").read_text()) for d in (single, multi))
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert one["key"] == two["key"]  # the same adapter: the key ignores the world size
    m = two["metrics"]
    assert (m["steps"], m["train_rows"]) == (6, 7)
    assert m["answer_tokens"] == one["metrics"]["answer_tokens"]  # global counts, not rank 0's

    a = load_file(single / "adapter_model.safetensors")
    b = load_file(multi / "adapter_model.safetensors")
    assert a.keys() == b.keys() and any("lora_B" in k for k in a)
    assert all(a[k].abs().max() > 0 for k in a)  # trained: B moved away from its zero init
    precision = one["metrics"]["precision"]
    assert precision == two["metrics"]["precision"] == run_precision()
    # Two ranks sum the rows' gradients in another order. fp32: after 6 Adam steps the worst
    # tensor (layer 0's down_proj lora_A) differs by up to ~1e-5 of its scale (measured over
    # three data seeds, with either cross-entropy backward). bf16: each rank's smaller matmuls
    # round differently; measured on a 2-core AVX512-BF16 EPYC (see BF16_* above). The weights
    # are no check of the loss scale (Adam and clipping hide a uniform factor): the per-step
    # loss, token counts and gradient norms below are.
    worst = max(float((a[k] - b[k]).abs().max() / a[k].abs().max()) for k in a)
    assert worst <= rel_tol(precision, fp32=3e-5, bf16=BF16_WEIGHTS), worst

    # The same global loss, token count and clipped-before gradient norm at every step.
    loss_tol = rel_tol(precision, fp32=1e-5, bf16=BF16_LOSS)
    grad_tol = rel_tol(precision, fp32=1e-4, bf16=BF16_GRAD_NORM)
    for r1, r2 in zip(_log(single), _log(multi), strict=True):
        assert r1["tokens"] == r2["tokens"] and r1["real_tokens"] == r2["real_tokens"]
        assert r2["loss"] == pytest.approx(r1["loss"], rel=loss_tol)
        assert r2["grad_norm"] == pytest.approx(r1["grad_norm"], rel=grad_tol)
    assert max(r["grad_norm"] for r in _log(single)) > 0.5  # clipping took part
