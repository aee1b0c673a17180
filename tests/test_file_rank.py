"""Dense methods truncate every module at the file's rank, not at its own Σr."""

from __future__ import annotations

import math

import torch
from conftest import make_adapter

from lorasum.adapters import read_adapter
from lorasum.compose import compose


def test_module_in_fewer_adapters_gets_the_file_rank(tiny_llama, tmp_path):
    """v_proj is in one rank-4 adapter, q_proj in two: the file has rank 8, and v_proj's
    pruned ΔW (full rank) is now kept at rank 8, with the error of its best rank-8
    approximation, no larger than at the rank 4 it used to be cut to."""
    from peft.utils.merge_utils import magnitude_prune

    a = make_adapter(tiny_llama, tmp_path / "a", r=4, targets=["q_proj", "v_proj"], seed=1)
    b = make_adapter(tiny_llama, tmp_path / "b", r=4, targets=["q_proj"], seed=2)
    marker = compose([a, b], tmp_path / "m", method="magnitude_prune", density=0.5)
    recipe = marker["recipe"]
    assert recipe["rank"] == 8
    module = "model.layers.0.self_attn.v_proj"
    assert recipe["modules"][module]["rank"] == 8

    # the oracle: prune v_proj's only ΔW plainly, SVD it, and measure both truncations
    f = read_adapter(a).modules[module]
    pruned = magnitude_prune([f.scale * f.B @ f.A], torch.ones(1), density=0.5)  # (d_out, d_in)
    S = torch.linalg.svdvals(pruned.double())
    assert int((1e-6 * S[0] < S).sum()) > 8  # pruning made it full rank: truncation matters

    def tail_error(k: int) -> float:
        return math.sqrt(float((S[k:] ** 2).sum() / (S**2).sum()))

    error = recipe["modules"][module]["relative_error"]
    assert math.isclose(error, tail_error(8), rel_tol=1e-4)
    assert error <= tail_error(4)
    written = read_adapter(tmp_path / "m").modules[module]
    delta = written.scale * written.B.double() @ written.A.double()
    assert math.isclose(
        float((delta - pruned.double()).norm() / pruned.double().norm()),
        tail_error(8),
        rel_tol=1e-3,
    )
