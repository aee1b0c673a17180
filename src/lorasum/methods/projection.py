"""`orthogonal_projection`: each ΔW_j keeps full strength where its own domain's inputs live and
is projected off the input directions that belong to the other domains.

Where the idea comes from. RegMean (arXiv 2212.09849) writes the merge as Σ_j ΔW_j Ĝ_j M⁻¹
with M = Σ Ĝ: in the generalised eigenbasis of (Ĝ_j, M) that is ΔW_j scaled by μ ∈ [0, 1], the
share of the input energy that comes from domain j, so it also halves ΔW_j on inputs every
domain shares (the mean, not the sum). OSRM (arXiv 2505.22934) instead constrains each LoRA
to input directions where the *other* tasks' activations have little energy, so that ΔW_j
X_i ≈ 0 for i ≠ j. This method keeps RegMean's generalised eigenbasis but makes the factor
hard: 1 (the sum's full strength) where domain j's share of the energy is not small, 0 where
the other domains dominate — cross-talk removed, own domain untouched.

Exact definition, for one module, N adapters, per-token input Gram matrices Ĝ_i
(`lorasum.calibration`), ρ = ``--projection-ratio`` (default 4):

1. Ḡ_j = (1/(N−1)) Σ_{i≠j} Ĝ_i, the mean of the other domains (0 when N = 1), so that the
   threshold does not move with N; M_j = Ĝ_j + Ḡ_j + λI, λ = 1e-6 · tr(Ĝ_j + Ḡ_j).
2. Generalised eigenvectors Ĝ_j v_k = μ_k M_j v_k, normalised v_kᵀ M_j v_l = δ_kl. Then
   μ_k ∈ [0, 1] is the share of domain j in the input energy along v_k: v_kᵀ Ĝ_j v_k = μ_k,
   v_kᵀ Ḡ_j v_k ≈ 1 − μ_k, and the coordinates c_k = v_kᵀ x are uncorrelated under both.
   Every input decomposes as x = Σ_k c_k (M_j v_k).
3. Keep the coordinates where the others' energy is at most ρ times domain j's:
   K_j = {k : μ_k > 1/(1 + ρ)}, and P_j = M_j V_K V_Kᵀ (d_in, d_in), the projector onto the
   kept components along the dropped ones (orthogonal in the whitened metric ⟨x, y⟩ =
   xᵀ M_j⁻¹ y, hence the name).
4. ΔW = Σ_j w_j ΔW_j P_j = Σ_j s_j B_j (w_j A_j P_j), a LoRA of rank Σ r_j.

Computed as M_j = L Lᵀ (Cholesky), C = L⁻¹ Ĝ_j L⁻ᵀ = Q diag(μ) Qᵀ, V = L⁻ᵀ Q, so
A_j P_j = ((A_j L) Q_K Q_Kᵀ) L⁻¹: one d_in×d_in Cholesky and eigendecomposition per adapter,
never a d_out×d_in matrix. ``--rank`` truncates the result (factored SVD).

What it guarantees (tested): when the domains' inputs lie in disjoint subspaces, the
composition acts on domain j's inputs exactly as ΔW_j, whatever directions the ΔW_i read (the
sum adds the others' cross-talk there); when all domains' inputs coincide (μ = 1/2
everywhere) nothing is dropped and it is the sum, where RegMean gives the mean (on the span
of the inputs). Between the two, ρ trades strength on shared directions against cross-talk;
the default ρ = 4 (drop where the others have ≥ 4× domain j's energy, μ ≤ 0.2) is not tuned.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from lorasum.factors import LoraFactors
from lorasum.methods.registry import MergeMethod, ModuleMerge
from lorasum.methods.regmean import _FACTORED, lora_result, with_ridge

if TYPE_CHECKING:
    from lorasum.methods.config import MergeConfig


def projection_basis(
    own: torch.Tensor, others: torch.Tensor, ratio: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, Q_kept): M_j = L Lᵀ and the kept eigenvectors of C = L⁻¹ Ĝ_j L⁻ᵀ (float64).

    C is formed in float64; its eigenvalues lie in [0, 1], so its eigendecomposition runs in
    float32 (2–3× faster than float64; the projector moves by ~1e-6 relative, and only an
    eigenvalue within ~1e-7 of the threshold could be kept or dropped differently).
    """
    L = torch.linalg.cholesky(with_ridge(own + others))  # M_j = L Lᵀ, (d_in, d_in)
    half = torch.linalg.solve_triangular(L, own, upper=False)  # L⁻¹ Ĝ_j
    C = torch.linalg.solve_triangular(L, half.T, upper=False)  # L⁻¹ Ĝ_j L⁻ᵀ
    mu, Q = torch.linalg.eigh(((C + C.T) / 2).float())  # (d_in,), (d_in, d_in)
    return L, Q[:, mu > 1.0 / (1.0 + ratio)].double()  # (d_in, k)


def projected_A(A: torch.Tensor, basis: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """A P (r, d_in) for rows A (r, d_in) and ``projection_basis``'s (L, Q_kept)."""
    L, Q_kept = basis
    Y = ((A @ L) @ Q_kept) @ Q_kept.T  # (r, d_in)
    return torch.linalg.solve_triangular(L.T, Y.T, upper=True).T  # Y L⁻¹


def merge_orthogonal_projection(
    terms: Sequence[LoraFactors | None],
    weights: Sequence[float],
    config: MergeConfig,
    module: str,
    grams: Sequence[torch.Tensor],
) -> ModuleMerge:
    ratio = config.option("projection_ratio")
    grams = [g.double() for g in grams]  # the same objects when already float64

    def bases() -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        out = []
        for j, t in enumerate(terms):
            rest = [g for i, g in enumerate(grams) if i != j]
            others = sum(rest) / len(rest) if rest else torch.zeros_like(grams[j])  # Ḡ_j
            out.append(None if t is None else projection_basis(grams[j], others, ratio))
        return out

    present = tuple(t is not None for t in terms)
    found = _FACTORED.get(grams, ("projection", ratio, present), bases)  # q/k/v: once
    Bs, As = [], []
    for t, w, basis in zip(terms, weights, found, strict=True):
        if t is None:
            continue
        A = (w * t.scale) * t.A.double()  # (r, d_in)
        As.append(projected_A(A, basis))
        Bs.append(t.B.double())  # (d_out, r)
    B, A = torch.cat(Bs, dim=1), torch.cat(As, dim=0)
    return lora_result(B, A, config)


ORTHOGONAL_PROJECTION = MergeMethod(
    name="orthogonal_projection",
    merge=merge_orthogonal_projection,
    summary="each ΔW_i kept at full strength on its own domain's inputs, projected off "
    "directions where other domains' inputs dominate (needs calibration)",
    options=frozenset({"projection_ratio", "rank", "keep"}),
    calibration=True,
)
