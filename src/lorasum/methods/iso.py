"""`iso`: Iso-C, isotropic merging of the task-arithmetic sum, in the core space.

Marczak, Magistri, Cygert, Twardowski, Bagdanov, van de Weijer, "No Task Left Behind:
Isotropic Model Merging with Common and Task-Specific Subspaces", ICML 2025, arXiv 2502.04959.

Our reading of Iso-C for one layer:

1. the task-arithmetic sum ΔM = Σ_i w_i·ΔW_i (the paper uses w_i = 1);
2. its SVD ΔM = U Σ Vᵀ;
3. flatten the spectrum: every singular value becomes σ̄ = (1/k) Σ_j σ_j, the mean over the k
   singular values of ΔM, so ΔM_iso = σ̄ · U Vᵀ;
4. ΔW = α · ΔM_iso with α = ``--method-scale`` (the paper tunes α on validation data; default 1).

In the paper ΔM is a full-rank fine-tuning delta and k = min(d_out, d_in). A sum of LoRAs has at
most Σr non-zero singular values and the rest of the spectrum is exactly zero, so we isotropise
only those: k = the numerical rank of ΔM (σ > 1e-6·σ_max), ≤ Σr. Isotropising the zero
directions would add arbitrary directions that no task trained. The SVD is the factored one
(QRs of the stacked factors + SVD of the Σr×Σr core); the result has rank k.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from lorasum.factors import LoraFactors, ThinSVD, factored_svd, nonzero_directions, stacked
from lorasum.methods.lowrank import truncate
from lorasum.methods.options import KEEP, METHOD_SCALE, RANK
from lorasum.methods.registry import MergeMethod, ModuleMerge

if TYPE_CHECKING:
    from lorasum.methods.config import MergeConfig


def isotropic(svd: ThinSVD) -> ThinSVD:
    """The same singular vectors over the non-zero spectrum, every σ replaced by their mean."""
    k = nonzero_directions(svd.S)
    mean = svd.S[:k].mean() if k else svd.S.new_zeros(())
    return ThinSVD(
        U=svd.U[:, :k], S=torch.full((k,), float(mean), dtype=svd.S.dtype), V=svd.V[:, :k]
    )


def merge_iso(
    terms: Sequence[LoraFactors | None],
    weights: Sequence[float],
    config: MergeConfig,
    module: str,
) -> ModuleMerge:
    B, A = stacked(terms, weights)  # (d_out, R), (R, d_in)
    flat = isotropic(factored_svd(B, A))
    return truncate(
        flat,
        config.option("rank"),
        config.option("keep"),
        flat.S.numel(),
        config.option("method_scale"),
    )


ISO = MergeMethod(
    name="iso",
    merge=merge_iso,
    summary="Iso-C: SVD of the sum with every non-zero singular value set to their mean",
    options=(METHOD_SCALE, RANK, KEEP),
    notes={"rank": "default its own rank"},
)
