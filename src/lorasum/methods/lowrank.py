"""Back to LoRA form: truncate a thin SVD to the requested rank and report what it keeps.

Shared by the methods. The factored path (`svd`, `tsv`, `iso`) never builds a d_out×d_in
matrix; the dense path (`ties`, `dare_*`, `magnitude_prune`) SVDs one module's dense ΔW.
"""

from __future__ import annotations

import math

import torch

from lorasum.factors import ThinSVD, lora_from_svd, rank_for_energy
from lorasum.methods.registry import ModuleMerge


def truncate(
    svd: ThinSVD, rank: int | str | None, keep: float, default_rank: int, scale: float = 1.0
) -> ModuleMerge:
    """Best rank-k approximation (Eckart–Young) of scale·U S Vᵀ as LoRA factors.

    k = min(rank, available) for an integer rank, the smallest rank keeping ``keep`` of Σσ²
    for ``"auto"``, and ``default_rank`` (capped likewise) for ``None``.
    """
    available = svd.S.numel()
    if rank == "auto":
        k = rank_for_energy(svd.S, keep)
    else:
        k = min(default_rank if rank is None else int(rank), available)
    energy = svd.S.double() ** 2  # (available,)
    total = float(energy.sum())
    tail = float(energy[k:].sum())
    kept = 1.0 if total == 0.0 else max(0.0, 1.0 - tail / total)
    relative_error = 0.0 if total == 0.0 else math.sqrt(tail / total)
    return ModuleMerge(
        lora_from_svd(svd, k, scale), kept_energy=kept, relative_error=relative_error
    )


def dense_svd(delta: torch.Tensor) -> ThinSVD:
    """Thin SVD of one dense ΔW (d_out, d_in) in fp32 (one module in memory at a time)."""
    U, S, Vh = torch.linalg.svd(delta.float(), full_matrices=False)  # (d_out,k) (k,) (k,d_in)
    return ThinSVD(U=U, S=S, V=Vh.T)


def dense_to_lora(
    delta: torch.Tensor, rank: int | str | None, keep: float, default_rank: int
) -> ModuleMerge:
    """A dense merged ΔW back to LoRA form through a truncated SVD."""
    return truncate(dense_svd(delta), rank, keep, default_rank)
