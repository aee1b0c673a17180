"""Dense ΔW per module for the element-wise methods (TIES, DARE, magnitude pruning).

These methods act on the entries of each task's ΔW_i, which exist only densely: ΔW_i is built
for one module at a time, merged, and brought back to LoRA form by a truncated SVD, so peak
memory is a few d_out×d_in matrices of a single module.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch

from lorasum.factors import LoraFactors, delta

#: What ``--rank`` means to these methods (its help).
RANK_NOTE = "default the file's rank (the largest Σr over modules)"


def dense_deltas(terms: Sequence[LoraFactors | None]) -> list[torch.Tensor]:
    """[s_i·B_i·A_i] in fp32, (d_out, d_in) each; a missing module is a zero ΔW."""
    shape = next(t.shape for t in terms if t is not None)
    return [
        torch.zeros(shape) if t is None else delta(t.A, t.B, t.scale)  # (d_out, d_in)
        for t in terms
    ]


def total_rank(terms: Sequence[LoraFactors | None]) -> int:
    """Σ r_i over the adapters that adapt the module (the rank of their plain sum;
    `merge_adapters` truncates at the file's rank, the largest of these over modules)."""
    return sum(t.rank for t in terms if t is not None)


def call_peft(fn: Callable[..., torch.Tensor], deltas, weights, **kwargs) -> torch.Tensor:
    """Call a `peft.utils.merge_utils` function on dense deltas with fp32 weights.

    PEFT warns that density ≥ 1 prunes nothing, which is the intended meaning here.
    """
    w = torch.tensor(list(weights), dtype=torch.float32)  # (N,)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The density .* no pruning")
        return fn(deltas, w, **kwargs)  # (d_out, d_in)
