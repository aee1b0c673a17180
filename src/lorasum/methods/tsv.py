"""`tsv`: Task Singular Vectors merge (TSV-M), in the core space of the stacked factors.

Gargiulo, Crisostomi, Bucarelli, Scardapane, Silvestri, Rodolà, "Task Singular Vectors:
Reducing Task Interference in Model Merging", CVPR 2025, arXiv 2412.00081.

Our reading of TSV-M for one layer, with T tasks and ΔW_i = w_i·s_i·B_i·A_i:

1. per task, the SVD ΔW_i = U_i Σ_i V_iᵀ, truncated to its top k_i singular directions. The
   paper keeps a fraction 1/T of each task's spectrum, k = ⌊min(d_out, d_in)/T⌋; a LoRA task
   has only r_i non-zero directions, so k_i = min(r_i, ⌊min(d_out, d_in)/T⌋) — all of them
   unless T·r_i > min(d_out, d_in). ``--task-rank`` overrides k (still capped at r_i).
   Directions with σ ≤ 1e-6·σ_max of their task (a rank-deficient B or A) are dropped.
2. concatenate U = [U_1 … U_T] (d_out, K), Σ = diag(Σ_1, …, Σ_T) (K, K), V = [V_1 … V_T] (d_in, K).
3. orthogonalise: U⊥ = P Qᵀ from the SVD U = P S Qᵀ (the orthogonal matrix nearest to U,
   Procrustes), likewise V⊥.
4. ΔW = α · U⊥ Σ V⊥ᵀ, with α = ``--method-scale`` (the paper's scaling coefficient, default 1).

Everything is factored: each task's SVD comes from its own B_i, A_i (QRs + r_i×r_i core), and
the orthogonalisation is an SVD of a d×K matrix with K ≤ Σr. The result has rank K (or
``--rank``, truncated by a factored SVD).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from lorasum.factors import LoraFactors, ThinSVD, factored_svd, nonzero_directions
from lorasum.methods.lowrank import truncate
from lorasum.methods.options import KEEP, METHOD_SCALE, RANK, Option, at_least
from lorasum.methods.registry import MergeMethod, ModuleMerge

if TYPE_CHECKING:
    from lorasum.methods.config import MergeConfig

TASK_RANK = Option(
    "task_rank",
    int,
    None,
    "singular directions kept per task (default: the paper's min(d_out, d_in)/T, capped at "
    "each task's rank)",
    check=at_least(1),
)


def polar(M: torch.Tensor) -> torch.Tensor:
    """Nearest matrix with orthonormal columns to M (d, K): P Qᵀ from M = P S Qᵀ."""
    P, _, Qh = torch.linalg.svd(M, full_matrices=False)  # (d, k), (k,), (k, K)
    return P @ Qh  # (d, K)


def task_directions(
    terms: Sequence[LoraFactors | None], weights: Sequence[float], task_rank: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Concatenated top singular triplets of every task: U (d_out, K), S (K,), V (d_in, K)."""
    shape = next(t.shape for t in terms if t is not None)
    per_task = task_rank if task_rank is not None else max(1, min(shape) // len(terms))
    Us, Ss, Vs = [], [], []
    for t, w in zip(terms, weights, strict=True):
        if t is None:
            continue  # a zero ΔW has no singular directions
        svd = factored_svd(t.B, (w * t.scale) * t.A.double())  # (d_out, r), (r,), (d_in, r)
        k = min(per_task, nonzero_directions(svd.S))
        Us.append(svd.U[:, :k])
        Ss.append(svd.S[:k])
        Vs.append(svd.V[:, :k])
    return torch.cat(Us, dim=1), torch.cat(Ss), torch.cat(Vs, dim=1)


def merge_tsv(
    terms: Sequence[LoraFactors | None],
    weights: Sequence[float],
    config: MergeConfig,
    module: str,
) -> ModuleMerge:
    U, S, V = task_directions(terms, weights, config.option("task_rank"))  # (d_out,K) (K,) (d_in,K)
    if S.numel() == 0:  # every task's ΔW is zero here: an empty (rank-0) result
        return truncate(ThinSVD(U=U, S=S, V=V), 0, 1.0, 0)
    U_orth, V_orth = polar(U), polar(V)  # (d_out, K), (d_in, K)
    # U⊥ Σ V⊥ᵀ is not itself an SVD; re-factor it (K×K core) so --rank truncates optimally.
    merged = factored_svd(U_orth * S, V_orth.T)  # ΔW/α
    return truncate(
        merged,
        config.option("rank"),
        config.option("keep"),
        S.numel(),
        scale=config.option("method_scale"),
    )


TSV = MergeMethod(
    name="tsv",
    merge=merge_tsv,
    summary="Task Singular Vectors (TSV-M): per-task top singular vectors, orthogonalised",
    options=(METHOD_SCALE, TASK_RANK, RANK, KEEP),
    notes={"rank": "default its own rank"},
)
