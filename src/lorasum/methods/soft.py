"""`soft_projection`: the sum's full strength wherever domain j has at least its fair share
of the input energy, `regmean_rescaled`'s shrinking (N·μ) where the other domains dominate.

Where the idea comes from: in the generalised eigenbasis of (Ĝ_j, M), M = Σ_i Ĝ_i + λI, RegMean
(arXiv 2212.09849, α = 1) scales ΔW_j by μ_k (domain j's share of the input energy along
direction k, in [0, 1]); `regmean_rescaled` by N·μ_k — the sum where all domains' inputs
coincide (μ = 1/N), but N× the sum on directions only domain j uses (μ = 1), where the
adapter was never trained to be N times stronger. `orthogonal_projection` makes the factor a
hard 0/1 step. This method takes the smaller of the sum's factor and the rescaled one:

    f(μ) = min(1, N·μ),     ΔW = Σ_j w_j ΔW_j M V_j diag(f(μ_j)) V_jᵀ

with Ĝ_j V_j = M V_j diag(μ_j), V_jᵀ M V_j = I, λ = 1e-6·tr(Σ Ĝ_i). An adapter that does not
adapt the module still has its Ĝ in M (its domain wants the base weights there), as in
RegMean. Factored as in `orthogonal_projection`: A_j P_j = ((A_j L) Q diag(f) Qᵀ) L⁻¹ with
M = L Lᵀ and L⁻¹ Ĝ_j L⁻ᵀ = Q diag(μ) Qᵀ; the Cholesky of M is shared by all adapters.

Properties (tested): identical input statistics (μ = 1/N everywhere) give the sum on the span
of the inputs (the ridge makes μ slightly below 1/N where the inputs have no energy); inputs on
disjoint subspaces give ΔW_j exactly on domain j's inputs (μ = 1 there, 0 on the others'
directions); no threshold or other constant to tune.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from lorasum.factors import LoraFactors
from lorasum.methods.options import KEEP, RANK
from lorasum.methods.projection import cached_spectrum, projected_A, tensor_digest
from lorasum.methods.registry import MergeMethod, ModuleMerge
from lorasum.methods.regmean import _FACTORED, lora_result, with_ridge

if TYPE_CHECKING:
    from lorasum.methods.config import MergeConfig


def soft_basis(
    grams: Sequence[torch.Tensor], present: Sequence[bool]
) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
    """Per adapter (L, Q diag(f)^½): M = L Lᵀ and the eigenvectors of L⁻¹ Ĝ_j L⁻ᵀ scaled so
    that Y Yᵀ = Q diag(f) Qᵀ (float64; one Cholesky for all, eigenpairs in float32 as in
    `projection_bases`)."""
    n = len(grams)
    L = torch.linalg.cholesky(with_ridge(sum(grams)))  # (d_in, d_in)
    out: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n
    digest = tensor_digest(L)
    for j in range(n):
        if not present[j]:
            continue
        mu, Q = cached_spectrum(L, grams[j], digest)  # (d_in,), (d_in, d_in); once per (L, Ĝ_j)
        f = (n * mu.double()).clamp(0.0, 1.0)  # min(1, N μ); μ < 0 only by rounding
        keep = f > 0
        out[j] = (L, Q.double()[:, keep] * f[keep].sqrt())
    return out


def merge_soft_projection(
    terms: Sequence[LoraFactors | None],
    weights: Sequence[float],
    config: MergeConfig,
    module: str,
    grams: Sequence[torch.Tensor],
) -> ModuleMerge:
    grams = [g.double() for g in grams]
    present = tuple(t is not None for t in terms)
    found = _FACTORED.get(grams, ("soft", present), lambda: soft_basis(grams, present))
    Bs, As = [], []
    for t, w, basis in zip(terms, weights, found, strict=True):
        if t is None:
            continue
        A = (w * t.scale) * t.A.double()  # (r, d_in)
        As.append(projected_A(A, basis))  # A L (Q f^½)(Q f^½)ᵀ L⁻¹
        Bs.append(t.B.double())  # (d_out, r)
    return lora_result(torch.cat(Bs, dim=1), torch.cat(As, dim=0), config)


SOFT_PROJECTION = MergeMethod(
    name="soft_projection",
    merge=merge_soft_projection,
    summary="N × RegMean with each eigen-direction's factor capped at 1: the sum's strength "
    "on a domain's own inputs, cross-talk suppressed (needs calibration)",
    options=(RANK, KEEP),
    notes={"rank": "default Σr (exact)"},
    calibration=True,
)
