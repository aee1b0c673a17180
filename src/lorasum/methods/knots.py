"""`knots_ties`, `knots_ta`: KnOTS, merging LoRAs aligned in the SVD basis of their concatenation.

Stoica, Ramesh, Ecsedi, Choshen, Hoffman, "Model merging with SVD to tie the KnOTS", ICLR 2025,
arXiv 2410.19735 (reference code github.com/gstoica27/KnOTS, ``task_merger.SVDMerger``).

For one module with n adapters and ΔW_i = s_i·B_i·A_i (d_out, d_in; a missing module is a zero
ΔW_i):

1. concatenate column-wise and take the SVD, keeping the non-zero spectrum:
   [ΔW_1 … ΔW_n] = U Σ [V_1ᵀ … V_nᵀ]   (U: d_out×k, Σ: k×k, V_i: d_in×k, k ≤ Σr),
   so ΔW_i = U Σ V_iᵀ exactly: every task is written in one shared output basis U;
2. the per-task "aligned" matrices are the scaled ones, T_i = Σ V_iᵀ (k, d_in) (the paper's
   default ``s_on_V=True``: Σ is applied before the merge);
3. merge the T_i with a merge rule into T (k, d_in):
   - ``knots_ties``: TIES on the T_i, with PEFT's semantics as our `ties` (keep the top
     ``--density`` entries of each T_i by magnitude, elect a sign per entry by ``total`` or
     ``frequency``, mean of the weighted entries w_i·T_i that agree with it). The reference
     trims over all layers of a model at once; we trim per module, like `ties`;
   - ``knots_ta``: task arithmetic, T = Σ_i w_i T_i. This is linear, so the result equals the
     weighted sum Σ w_i ΔW_i (KnOTS only changes non-linear merge rules); it is registered as
     the paper's TA row and as a check of the alignment;
4. ΔW = U T (the reference multiplies U by the merged ΣV; Σ is not applied twice).

Factored: [ΔW_1 … ΔW_n] = [B_1 … B_n]·blockdiag(s_1 A_1, …, s_n A_n). A QR of the stacked B's,
QRs of each s_i A_iᵀ and the SVD of the Σr×Σr core give U, Σ and every V_i without a
d_out×(n·d_in) matrix; the merge works on k×d_in matrices (k ≤ Σr). Directions with
σ ≤ 1e-6·σ_max are dropped (the reference drops σ ≤ 1e-5). The result has rank ≤ k, or
``--rank`` (best rank-K approximation of U T).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from lorasum.factors import LoraFactors, factored_svd, nonzero_directions
from lorasum.methods.dense import call_peft
from lorasum.methods.lowrank import truncate
from lorasum.methods.options import DENSITY, KEEP, MAJORITY_SIGN, RANK
from lorasum.methods.registry import MergeMethod, ModuleMerge

if TYPE_CHECKING:
    from lorasum.methods.config import MergeConfig


def aligned_tasks(
    terms: Sequence[LoraFactors | None],
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Shared basis U (d_out, k) and each task's T_i = Σ V_iᵀ (k, d_in), float64.

    [ΔW_1 … ΔW_n] = U [T_1 … T_n]; a missing term gets T_i = 0.
    """
    present = [t for t in terms if t is not None]
    d_in = present[0].shape[1]
    Q_b, R_b = torch.linalg.qr(torch.cat([t.B.double() for t in present], dim=1))  # (d_out,kb)
    Q_as, R_as = zip(*(torch.linalg.qr(t.scale * t.A.double().T) for t in present), strict=True)
    core = R_b @ torch.block_diag(*R_as).T  # (kb, Σm_i): R_b R_aᵀ
    U_c, S, V_ch = torch.linalg.svd(core, full_matrices=False)  # (kb,q) (q,) (q,Σm_i)
    k = nonzero_directions(S)
    U = Q_b @ U_c[:, :k]  # (d_out, k)
    tasks: list[torch.Tensor] = []
    rows = iter(torch.split(V_ch[:k].T, [q.shape[1] for q in Q_as], dim=0))  # (m_i, k) each
    Q_iter = iter(Q_as)
    for t in terms:
        if t is None:
            tasks.append(torch.zeros(k, d_in, dtype=torch.float64))
            continue
        V_i = next(Q_iter) @ next(rows)  # (d_in, k)
        tasks.append(S[:k, None] * V_i.T)  # (k, d_in)
    return U, tasks


def _finish(U: torch.Tensor, merged: torch.Tensor, config: MergeConfig) -> ModuleMerge:
    """ΔW = U·T back to LoRA form (truncated to --rank if given)."""
    k = U.shape[1]
    if k == 0:  # every ΔW_i is zero here
        return truncate(factored_svd(U, merged), 0, 1.0, 0)
    return truncate(factored_svd(U, merged), config.option("rank"), config.option("keep"), k)


def merge_knots_ties(
    terms: Sequence[LoraFactors | None],
    weights: Sequence[float],
    config: MergeConfig,
    module: str,
) -> ModuleMerge:
    from peft.utils import merge_utils

    U, tasks = aligned_tasks(terms)
    merged = call_peft(
        merge_utils.ties,
        tasks,
        weights,
        density=config.option("density"),
        majority_sign_method=config.option("majority_sign"),
    )  # (k, d_in)
    return _finish(U, merged.double(), config)


def merge_knots_ta(
    terms: Sequence[LoraFactors | None],
    weights: Sequence[float],
    config: MergeConfig,
    module: str,
) -> ModuleMerge:
    U, tasks = aligned_tasks(terms)
    merged = sum(w * T for w, T in zip(weights, tasks, strict=True))  # (k, d_in)
    return _finish(U, merged, config)


KNOTS_TIES = MergeMethod(
    name="knots_ties",
    merge=merge_knots_ties,
    summary="KnOTS-TIES: TIES on the tasks' ΣVᵢᵀ in the SVD basis of [ΔW_1 … ΔW_n], then U·(merged)",
    options=(DENSITY, MAJORITY_SIGN, RANK, KEEP),
    required=frozenset({"density"}),
    notes={"density": "of each task's ΣVᵢᵀ", "rank": "default its own rank"},
)
KNOTS_TA = MergeMethod(
    name="knots_ta",
    merge=merge_knots_ta,
    summary="KnOTS-TA: Σ wᵢ ΣVᵢᵀ in the SVD basis of [ΔW_1 … ΔW_n] (equals the weighted sum)",
    options=(RANK, KEEP),
    notes={"rank": "default its own rank"},
)
