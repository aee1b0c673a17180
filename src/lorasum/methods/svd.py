"""`svd`: the exact weighted sum re-compressed to rank K, in factored form.

    B = [B_1 … B_N]  (d_out, R)      A = [w_1 s_1 A_1; …]  (R, d_in)      R = Σ r_i
    B = Q_b R_b,  Aᵀ = Q_a R_a,  R_b R_aᵀ = U_c S V_cᵀ   ⇒   ΔW = (Q_b U_c) S (Q_a V_c)ᵀ

Never a d_out×d_in matrix: two QRs of tall matrices and the SVD of an R×R core. For K ≥ R the
result equals the sum (up to rounding); below, it is the best rank-K approximation in the
Frobenius and spectral norms (Eckart–Young). ``--rank auto`` picks per module the smallest K
keeping ``--keep`` of ‖ΔW‖²_F.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from lorasum.factors import LoraFactors, factored_svd, stacked
from lorasum.methods.lowrank import truncate
from lorasum.methods.options import KEEP, RANK
from lorasum.methods.registry import MergeMethod, ModuleMerge

if TYPE_CHECKING:
    from lorasum.methods.config import MergeConfig


def merge_svd(
    terms: Sequence[LoraFactors | None],
    weights: Sequence[float],
    config: MergeConfig,
    module: str,
) -> ModuleMerge:
    """Best rank-K approximation of Σ w_i ΔW_i (exact for K ≥ Σr)."""
    B, A = stacked(terms, weights)  # (d_out, R), (R, d_in)
    return truncate(factored_svd(B, A), config.option("rank"), config.option("keep"), B.shape[1])


SVD = MergeMethod(
    name="svd",
    merge=merge_svd,
    summary="weighted sum re-compressed to --rank K (factored SVD; exact when K ≥ Σr)",
    options=(RANK, KEEP),
    required=frozenset({"rank"}),
)
