"""`pico`: Pico, pre-merge interference calibration in output space, then task arithmetic.

Tang & Yang, "Crowded in B-Space: Calibrating Shared Directions for LoRA Merging", arXiv
2604.16826 (2026). The paper's text could not be read here; the formulas below are those of the
authors' reference implementation (github.com/yixuantt/Pico, ``pico/pico.py``:
``PICO.calibrate_layer`` + ``PICO.compensate_energy``), which matches the abstract: "calibrates
B before merge by downscaling over-shared directions and then rescaling the merged update".

For one module, over the n adapters that adapt it (a missing module is left out, not counted):

1. stack the B's as stored (no scale, no weight): B_all = [B_1 … B_n] (d_out, Σr), thin SVD
   B_all = U diag(σ) Wᵀ;
2. collision of output direction k: c_k = σ_k² / Σ_j σ_j²; calibration coefficient
   α_k = 1 / (1 + (n − 1)·c_k) (the more of B's energy a direction carries, the more it is
   downscaled; n = 1 leaves everything as it is);
3. calibrate each B: B'_i = B_i + U diag(α − 1) Uᵀ B_i (the reference applies this to ΔW_i,
   which is the same thing because ΔW_i = B_i·s_i A_i); A_i is unchanged;
4. merge by task arithmetic: ΔW_fused = Σ_i w_i·s_i·B'_i A_i;
5. rescale (energy compensation): ΔW = γ·ΔW_fused with γ = mean_i ‖w_i ΔW_i‖_F / ‖ΔW_fused‖_F,
   the mean Frobenius norm of the (weighted) source updates. A zero ΔW_fused is kept (γ = 1).

Weights: optional (default 1), folded into each task's A in step 4 and into the target norm in
step 5; because of step 5 only their ratios and overall size matter, not a mean-vs-sum choice.
The reference's folder mode also rescales each calibrated adapter to its own norm before the
merge; that step is not part of the merge (``compensate_energy``) and is not done here.

Factored throughout: the SVD of the d_out×Σr stack, then the factored SVD of the merged stack
(Σr×Σr core). Result rank Σr, or ``--rank`` (best rank-K of the Pico result).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from lorasum.factors import LoraFactors, factored_svd, sq_norm
from lorasum.methods.lowrank import truncate
from lorasum.methods.options import KEEP, RANK
from lorasum.methods.registry import MergeMethod, ModuleMerge

if TYPE_CHECKING:
    from lorasum.methods.config import MergeConfig


def calibration_coefficients(
    B_all: torch.Tensor, n_tasks: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output directions U (d_out, m) of the stacked B's and their coefficients α (m,)."""
    U, sigma, _ = torch.linalg.svd(B_all.double(), full_matrices=False)  # (d_out, m), (m,)
    energy = sigma**2
    collision = energy / energy.sum().clamp(min=1e-300)  # (m,) c_k, sums to 1
    alpha = 1.0 / (1.0 + (n_tasks - 1) * collision)  # (m,)
    return U, alpha


def calibrate_b(B: torch.Tensor, U: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """B' = B + U diag(α − 1) Uᵀ B, (d_out, r)."""
    B = B.double()
    return B + U @ ((alpha - 1.0)[:, None] * (U.T @ B))


def merge_pico(
    terms: Sequence[LoraFactors | None],
    weights: Sequence[float],
    config: MergeConfig,
    module: str,
) -> ModuleMerge:
    present = [(t, w) for t, w in zip(terms, weights, strict=True) if t is not None]
    U, alpha = calibration_coefficients(torch.cat([t.B for t, _ in present], dim=1), len(present))
    B = torch.cat([calibrate_b(t.B, U, alpha) for t, _ in present], dim=1)  # (d_out, Σr)
    A = torch.cat([(w * t.scale) * t.A.double() for t, w in present], dim=0)  # (Σr, d_in)
    fused = factored_svd(B, A)
    target = sum(abs(w) * math.sqrt(sq_norm(t)) for t, w in present) / len(present)
    norm = math.sqrt(fused.energy)
    gamma = target / norm if norm > 0.0 else 1.0
    result = truncate(fused, config.option("rank"), config.option("keep"), A.shape[0], scale=gamma)
    result.details.update(
        {"pico_gamma": gamma, "pico_min_alpha": float(alpha.min()) if alpha.numel() else 1.0}
    )
    return result


PICO = MergeMethod(
    name="pico",
    merge=merge_pico,
    summary="Pico: downscale the output directions the adapters' B share, sum, rescale to the "
    "mean source norm",
    options=(RANK, KEEP),
    notes={"rank": "default Σr"},
)
