"""`shift_match`: per module, one coefficient per adapter, solved in closed form so that on each
domain's inputs the composition moves the outputs along that domain's own shift by exactly as
much as its own adapter does — no overshoot where adapters repeat each other, no shrinking.

Where the idea comes from: LoRA Soups / CAT (arXiv 2410.13025) and LoraHub (2307.13269) learn
per-layer/per-adapter coefficients from data; RegMean (2212.09849) matches each adapter's
output shift ΔW_i X_i on its own domain's inputs, in closed form, but by least squares, which
halves what two adapters share (it degenerates to the mean). Pico (2604.16826) rescales the
directions adapters share instead. Here the matching is done in projection: the composed shift
on domain i, projected onto adapter i's own shift, must equal that shift. For one module with
present adapters i, j and per-token input Gram matrices Ĝ_i (`lorasum.analysis.calibration`):

    Σ_j c_j ⟨ΔW_j X_i, ΔW_i X_i⟩ = ‖ΔW_i X_i‖²      for every i,
    i.e.  K c = diag(K),   K_ij = tr(ΔW_j Ĝ_i ΔW_iᵀ) = s_i s_j Σ (B_jᵀ B_i) ∘ (A_j Ĝ_i A_iᵀ)

(K_ij / K_ii is the overshoot β_{j→i} that `lorasum predict` reports). Then ΔW = Σ_j c_j ΔW_j,
a LoRA of rank Σr: B = [B_1 …], A = [c_1 s_1 A_1; …]; only r×r cores are formed.

- Adapters that do not touch each other's domains (K diagonal) keep c = 1: the sum.
- Two adapters that repeat each other with β_{2→1} = β_{1→2} = β get c = 1/(1 + β): the part
  they share is counted once, not twice; identical adapters and inputs give the mean.
- Adapters that cancel each other on a domain (β < 0) get c > 1.
- Where no coefficients in [0, N] satisfy every equation (one adapter's shift is repeated
  several times over by the others, so the exact solution would flip its sign), the bounded
  least squares in the equations' own units, Σ_j c_j β_{j→i} = 1 with β_{j→i} = K_ij / K_ii,
  0 ≤ c ≤ N (scipy's `lsq_linear`, bounded-variable least squares run to convergence): the
  bounds are guards, not tuned. A ridge of 1e-6 toward c = 1 makes the solution unique where K
  is singular (identical adapters on identical inputs: c = 1/N, the mean, to 1e-6).
- Each domain counts once whatever the size of its adapter's shift, so a domain whose adapter
  barely moves this module still asks the others not to add along that direction; an equation
  is dropped only when its own shift is below 1e-6 of the largest one at the module (the
  result is not continuous at that cut-off).
- An adapter absent from the module has ΔW = 0 there and no equation; its domain's inputs are
  not constrained.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import torch

from lorasum.factors import LoraFactors, activation_inner
from lorasum.methods.options import KEEP, RANK
from lorasum.methods.registry import MergeMethod, ModuleMerge
from lorasum.methods.regmean import lora_result

if TYPE_CHECKING:
    from lorasum.methods.config import MergeConfig

RIDGE = 1e-6  # weight of ‖c − 1‖² against the equations (unique solution)
NEGLIGIBLE = 1e-6  # an own shift below this share of the module's largest sets no equation


def bounded_coefficients(beta: np.ndarray, upper: float) -> np.ndarray:
    """argmin_c ‖β c − 1‖² + RIDGE·‖c − 1‖² subject to 0 ≤ c ≤ upper; β (equations, N)."""
    from scipy.optimize import lsq_linear

    n = beta.shape[1]
    system = np.vstack([beta, np.sqrt(RIDGE) * np.eye(n)])
    target = np.concatenate([np.ones(beta.shape[0]), np.sqrt(RIDGE) * np.ones(n)])
    fit = lsq_linear(
        system, target, bounds=(0.0, upper), method="bvls", tol=1e-12, max_iter=100 * (n + 1)
    )
    if fit.status <= 0:  # bvls stops at max_iter otherwise; never seen at this limit
        raise RuntimeError(f"shift_match: bounded least squares did not converge ({fit.message})")
    return fit.x


def shift_coefficients(
    factors: Sequence[LoraFactors], grams: Sequence[torch.Tensor]
) -> torch.Tensor:
    """c (N,) float64: Σ_j c_j K_ij = K_ii for every i in the least-squares sense (rows in units
    of K_ii), 0 ≤ c ≤ N, ridge toward 1; K_ij = tr(ΔW_j Ĝ_i ΔW_iᵀ)."""
    n = len(factors)
    K = np.empty((n, n))
    for i, (fi, G) in enumerate(zip(factors, grams, strict=True)):
        for j, fj in enumerate(factors):
            K[i, j] = activation_inner(fj, fi, G)
    own = np.diag(K).copy()
    rows = own > NEGLIGIBLE * own.max() if own.max() > 0 else np.zeros(n, dtype=bool)
    if not rows.any():  # no adapter moves its own domain's outputs here: the sum
        return torch.ones(n, dtype=torch.float64)
    return torch.from_numpy(bounded_coefficients(K[rows] / own[rows, None], float(n)))


def merge_shift_match(
    terms: Sequence[LoraFactors | None],
    weights: Sequence[float],
    config: MergeConfig,
    module: str,
    grams: Sequence[torch.Tensor],
) -> ModuleMerge:
    here = [(t, g) for t, g in zip(terms, grams, strict=True) if t is not None]
    c = shift_coefficients([t for t, _ in here], [g for _, g in here])
    B = torch.cat([t.B.double() for t, _ in here], dim=1)  # (d_out, Σr)
    A = torch.cat(
        [(float(ci) * t.scale) * t.A.double() for ci, (t, _) in zip(c, here, strict=True)], dim=0
    )
    # the recipe records c per adapter, in the order given (None: the adapter lacks the module)
    found = iter(c.tolist())
    coefficients = [None if t is None else round(next(found), 6) for t in terms]
    return replace(lora_result(B, A, config), details={"coefficients": coefficients})


SHIFT_MATCH = MergeMethod(
    name="shift_match",
    merge=merge_shift_match,
    summary="per-module coefficients solved so each domain's own output shift is kept exactly "
    "(in projection): shared parts counted once (needs calibration)",
    options=(RANK, KEEP),
    notes={"rank": "default Σr (exact)"},
    weights="refused",
    calibration=True,
)
