"""`ties` and `magnitude_prune` on each module's dense ΔW, with PEFT's semantics.

TIES-Merging (Yadav et al., NeurIPS 2023, arXiv 2306.01708) as implemented by
`peft.utils.merge_utils.ties`, which this module calls on the dense ΔW_i = s_i·B_i·A_i:

1. trim: keep the top ``density`` fraction of each ΔW_i's entries by magnitude;
2. elect: per entry the majority sign of the trimmed (unweighted) ΔW_i, by their ``total``
   sum or by ``frequency`` of signs;
3. disjoint merge: the mean of the weighted entries w_i·ΔW_i that agree with the elected sign.

`magnitude_prune` (`peft.utils.merge_utils.magnitude_prune`) is step 1 followed by the plain
weighted sum. The result goes back to LoRA form by a truncated SVD at ``--rank`` (default: the
file's rank, the largest Σr over modules; see `methods.engine.file_rank`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from lorasum.factors import LoraFactors
from lorasum.methods.dense import RANK_NOTE, call_peft, dense_deltas, total_rank
from lorasum.methods.lowrank import dense_to_lora
from lorasum.methods.options import DENSITY, KEEP, MAJORITY_SIGN, RANK
from lorasum.methods.registry import MergeMethod, ModuleMerge

if TYPE_CHECKING:
    from lorasum.methods.config import MergeConfig


def merge_ties(
    terms: Sequence[LoraFactors | None],
    weights: Sequence[float],
    config: MergeConfig,
    module: str,
) -> ModuleMerge:
    from peft.utils import merge_utils

    merged = call_peft(
        merge_utils.ties,
        dense_deltas(terms),
        weights,
        density=config.option("density"),
        majority_sign_method=config.option("majority_sign"),
    )  # (d_out, d_in)
    return dense_to_lora(merged, config.option("rank"), config.option("keep"), total_rank(terms))


def merge_magnitude_prune(
    terms: Sequence[LoraFactors | None],
    weights: Sequence[float],
    config: MergeConfig,
    module: str,
) -> ModuleMerge:
    from peft.utils import merge_utils

    merged = call_peft(
        merge_utils.magnitude_prune, dense_deltas(terms), weights, density=config.option("density")
    )  # (d_out, d_in)
    return dense_to_lora(merged, config.option("rank"), config.option("keep"), total_rank(terms))


TIES = MergeMethod(
    name="ties",
    merge=merge_ties,
    summary="TIES on dense ΔW (trim to --density, elect sign, disjoint mean; PEFT semantics)",
    options=(DENSITY, MAJORITY_SIGN, RANK, KEEP),
    required=frozenset({"density"}),
    notes={"rank": RANK_NOTE},
    dense=True,
)
MAGNITUDE_PRUNE = MergeMethod(
    name="magnitude_prune",
    merge=merge_magnitude_prune,
    summary="keep the top --density entries of each dense ΔW by magnitude, then weighted sum",
    options=(DENSITY, RANK, KEEP),
    required=frozenset({"density"}),
    notes={"rank": RANK_NOTE},
    dense=True,
)
