"""`sum`, `weighted`, `mean`: the exact weighted sum ΔW = Σ w_i·s_i·B_i·A_i by rank concatenation.

    A = [w_1 s_1 A_1; …; w_N s_N A_N]  (Σr, d_in)      B = [B_1, …, B_N]  (d_out, Σr)

No approximation: the result has rank Σr (over the adapters that adapt the module). `sum` takes
optional weights (default 1), `weighted` requires them (any real numbers; a negative weight
negates a task), `mean` uses w_i = 1/N.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from lorasum.factors import LoraFactors, concat
from lorasum.methods.registry import MergeMethod, ModuleMerge

if TYPE_CHECKING:
    from lorasum.methods.config import MergeConfig


def merge_linear(
    terms: Sequence[LoraFactors | None],
    weights: Sequence[float],
    config: MergeConfig,
    module: str,
) -> ModuleMerge:
    """Σ w_i ΔW_i as one LoRA of rank Σr_i (exact)."""
    return ModuleMerge(concat(terms, weights))


SUM = MergeMethod(
    name="sum",
    merge=merge_linear,
    summary="exact sum Σ w_i ΔW_i by rank concatenation (weights optional, default 1)",
    exact=True,
)
WEIGHTED = MergeMethod(
    name="weighted",
    merge=merge_linear,
    summary="exact weighted sum Σ w_i ΔW_i (--weights required; negative = task negation)",
    weights="required",
    exact=True,
)
MEAN = MergeMethod(
    name="mean",
    merge=merge_linear,
    summary="exact mean (1/N) Σ ΔW_i",
    weights="refused",
    exact=True,
)
