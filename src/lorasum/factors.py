"""Pure tensor math on LoRA factors. No I/O, no models.

A LoRA module stores ΔW = s·B·A with A: (r, d_in), B: (d_out, r), s = alpha/r (or alpha/√r
with rsLoRA). ΔW is always expressed in the (d_out, d_in) orientation of ``nn.Linear``; GPT-2's
Conv1D stores its weight transposed, which only matters when adding ΔW into a base weight.

Inner products are computed in factored form and never build a d_out×d_in matrix:

    <s1·B1A1, s2·B2A2>_F = s1·s2 · tr(A1ᵀ B1ᵀ B2 A2) = s1·s2 · Σ (B1ᵀB2) ∘ (A1A2ᵀ)

which costs O((d_out + d_in)·r1·r2) instead of O(d_out·d_in·(r1 + r2)).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

# Inner products are accumulated in float64: the r×r cores are tiny, and cosines near 0 of
# large matrices are sums of many cancelling terms.
_ACC = torch.float64


@dataclass(frozen=True)
class LoraFactors:
    """One adapted module: ΔW = scale · B @ A."""

    A: torch.Tensor  # (r, d_in)
    B: torch.Tensor  # (d_out, r)
    scale: float

    def __post_init__(self) -> None:
        if self.A.ndim != 2 or self.B.ndim != 2 or self.A.shape[0] != self.B.shape[1]:
            raise ValueError(
                f"LoRA factors do not fit: A {tuple(self.A.shape)}, B {tuple(self.B.shape)}"
            )

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        """Shape of ΔW in (d_out, d_in) orientation."""
        return (self.B.shape[0], self.A.shape[1])


Factors = Mapping[str, LoraFactors]  # module name -> factors: one adapter


def delta(A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """Dense ΔW = scale · B @ A, (d_out, d_in), in float32. Use for merging, not for analysis."""
    return scale * (B.float() @ A.float())


def inner(f1: LoraFactors, f2: LoraFactors) -> float:
    """Frobenius inner product <ΔW1, ΔW2> in factored form."""
    if f1.shape != f2.shape:
        raise ValueError(f"ΔW shapes differ: {f1.shape} vs {f2.shape}")
    core_b = f1.B.to(_ACC).T @ f2.B.to(_ACC)  # (r1, r2)
    core_a = f1.A.to(_ACC) @ f2.A.to(_ACC).T  # (r1, r2)
    return float(f1.scale * f2.scale * (core_b * core_a).sum())


def activation_inner(f1: LoraFactors, f2: LoraFactors, G: torch.Tensor) -> float:
    """tr(ΔW_1 G ΔW_2ᵀ) for a (d_in, d_in) input Gram matrix G, from the factors:
    s1·s2·Σ (B1ᵀB2) ∘ (A1 G A2ᵀ)."""
    core_b = f1.B.to(_ACC).T @ f2.B.to(_ACC)  # (r1, r2)
    core_a = f1.A.to(_ACC) @ G.to(_ACC) @ f2.A.to(_ACC).T  # (r1, r2)
    return float(f1.scale * f2.scale * (core_b * core_a).sum())


def sq_norm(f: LoraFactors) -> float:
    """‖ΔW‖²_F in factored form (clamped at 0 against rounding)."""
    return max(inner(f, f), 0.0)


def cosine(f1: LoraFactors, f2: LoraFactors) -> float:
    """Cosine similarity of two ΔW matrices (flattened). 0.0 when either ΔW is zero.

    A zero ΔW is orthogonal to everything by convention (an untrained LoRA has B = 0).
    """
    n1, n2 = sq_norm(f1), sq_norm(f2)
    if n1 == 0.0 or n2 == 0.0:
        return 0.0
    c = inner(f1, f2) / math.sqrt(n1 * n2)
    return min(1.0, max(-1.0, c))


def rms(values: Sequence[float]) -> float:
    """Root mean square; NaN for an empty sequence."""
    if len(values) == 0:
        return float("nan")
    return math.sqrt(sum(v * v for v in values) / len(values))


def concat(
    terms: Sequence[LoraFactors | None], weights: Sequence[float], rank: int | None = None
) -> LoraFactors:
    """Exact weighted sum Σ w_i·s_i·B_i·A_i as one LoRA of rank Σ r_i (scale 1).

    A = [w_1 s_1 A_1; w_2 s_2 A_2; …]  (Σr, d_in)     B = [B_1, B_2, …]  (d_out, Σr)

    ``None`` terms are zero deltas (a module the adapter does not adapt). ``rank`` pads the
    result with zero rows/columns up to that rank so every module of a composed adapter can
    share one rank; the product is unchanged.
    """
    present = [(t, w) for t, w in zip(terms, weights, strict=True) if t is not None]
    if not present:
        raise ValueError("concat needs at least one non-empty term")
    shape = present[0][0].shape
    for t, _ in present:
        if t.shape != shape:
            raise ValueError(f"ΔW shapes differ: {t.shape} vs {shape}")
    A = torch.cat([(w * t.scale) * t.A.float() for t, w in present], dim=0)  # (Σr, d_in)
    B = torch.cat([t.B.float() for t, _ in present], dim=1)  # (d_out, Σr)
    if rank is not None:
        if rank < A.shape[0]:
            raise ValueError(f"rank {rank} is below the concatenated rank {A.shape[0]}")
        pad = rank - A.shape[0]
        A = torch.cat([A, A.new_zeros(pad, A.shape[1])], dim=0)
        B = torch.cat([B, B.new_zeros(B.shape[0], pad)], dim=1)
    return LoraFactors(A=A, B=B, scale=1.0)


def sum_factors(
    adapters: Sequence[Factors], weights: Sequence[float] | None = None
) -> dict[str, LoraFactors]:
    """Exact weighted sum of whole adapters, module by module (missing module = zero ΔW).

    Every module of the result has the same rank: the largest Σ r_i over modules.
    """
    if weights is None:
        weights = [1.0] * len(adapters)
    if len(weights) != len(adapters):
        raise ValueError(f"{len(weights)} weights for {len(adapters)} adapters")
    names = sorted(set().union(*(a.keys() for a in adapters)))
    rank = max(sum(a[n].rank for a in adapters if n in a) for n in names)
    return {n: concat([a.get(n) for a in adapters], weights, rank=rank) for n in names}


def module_cosines(a: Factors, b: Factors) -> dict[str, float]:
    """Per-module cosine over the modules both adapters adapt."""
    return {n: cosine(a[n], b[n]) for n in sorted(a.keys() & b.keys())}


def global_cosine(a: Factors, b: Factors) -> float:
    """Cosine of the two adapters as single vectors (all modules concatenated)."""
    shared = a.keys() & b.keys()
    num = sum(inner(a[n], b[n]) for n in shared)
    na = sum(sq_norm(f) for f in a.values())
    nb = sum(sq_norm(f) for f in b.values())
    if na == 0.0 or nb == 0.0:
        return 0.0
    return num / math.sqrt(na * nb)


# --- factored SVD and subspaces: never a d_out×d_in matrix --------------------------------------
#
# A product B @ A with B: (d_out, R) and A: (R, d_in) has rank ≤ R. Its thin SVD comes from two
# QR factorisations of tall matrices and the SVD of an R×R core:
#
#     B = Q_b R_b,  Aᵀ = Q_a R_a   ⇒   B A = Q_b (R_b R_aᵀ) Q_aᵀ = (Q_b U_c) S (Q_a V_c)ᵀ
#
# at O(R²·(d_out + d_in) + R³) time and O(R·(d_out + d_in)) memory. These helpers compute in
# float64: the tall factors are at most a few MB and the cores are tiny.


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Run torch on one thread inside the block (the previous setting is restored after).

    The factored algebra is many small LAPACK calls (QR of d×R, SVD of R×R with R ≤ a few
    hundred) that gain nothing from threads, while a threaded MKL/OpenMP call stalls when
    another process holds a core: measured on a 2-core machine with one busy core, a QR of
    4096×48 took 194 ms on 2 threads and 3.3 ms on 1. Dense work keeps every thread.
    """
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclass(frozen=True)
class ThinSVD:
    """ΔW = U · diag(S) · Vᵀ with orthonormal columns, S descending and ≥ 0."""

    U: torch.Tensor  # (d_out, k)
    S: torch.Tensor  # (k,)
    V: torch.Tensor  # (d_in, k)

    @property
    def energy(self) -> float:
        """‖ΔW‖²_F = Σ σ²."""
        return float((self.S.to(_ACC) ** 2).sum())


def stacked(
    terms: Sequence[LoraFactors | None], weights: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ w_i·s_i·B_i·A_i as stacked factors (B (d_out, Σr), A (Σr, d_in)), float64, unpadded."""
    present = [(t, w) for t, w in zip(terms, weights, strict=True) if t is not None]
    if not present:
        raise ValueError("stacked needs at least one non-empty term")
    B = torch.cat([t.B.to(_ACC) for t, _ in present], dim=1)  # (d_out, Σr)
    A = torch.cat([(w * t.scale) * t.A.to(_ACC) for t, w in present], dim=0)  # (Σr, d_in)
    return B, A


def factored_svd(B: torch.Tensor, A: torch.Tensor) -> ThinSVD:
    """Thin SVD of B @ A (B: (d_out, R), A: (R, d_in)) without forming B @ A, in float64."""
    B, A = B.to(_ACC), A.to(_ACC)
    Q_b, R_b = torch.linalg.qr(B)  # (d_out, k_b), (k_b, R)
    Q_a, R_a = torch.linalg.qr(A.T)  # (d_in, k_a), (k_a, R)
    core = R_b @ R_a.T  # (k_b, k_a), k ≤ R
    U_c, S, V_ch = torch.linalg.svd(core, full_matrices=False)  # (k_b, k), (k,), (k, k_a)
    return ThinSVD(U=Q_b @ U_c, S=S, V=Q_a @ V_ch.T)


def rank_for_energy(S: torch.Tensor, keep: float) -> int:
    """Smallest k whose top-k singular values keep ≥ ``keep`` of Σσ² (0 for a zero matrix)."""
    energy = S.to(_ACC) ** 2
    total = float(energy.sum())
    if total == 0.0:
        return 0
    kept = torch.cumsum(energy, 0) / total
    # a tiny slack absorbs rounding when keep is exactly reachable (e.g. keep = 1.0)
    return min(int((kept < keep - 1e-12).sum()) + 1, S.numel())


def nonzero_directions(S: torch.Tensor, rtol: float = 1e-6) -> int:
    """How many singular values are above ``rtol``·σ_max (S descending): the numerical rank."""
    if S.numel() == 0 or float(S[0]) == 0.0:
        return 0
    threshold = rtol * float(S[0])
    return int(S.gt(threshold).sum())


def lora_from_svd(svd: ThinSVD, k: int, scale: float = 1.0) -> LoraFactors:
    """Rank-k LoRA of scale·U_k S_k V_kᵀ, the singular values split evenly: B = U√S, A = √S Vᵀ."""
    root = svd.S[:k].to(_ACC).sqrt()  # (k,)
    B = svd.U[:, :k] * root  # (d_out, k)
    A = scale * root[:, None] * svd.V[:, :k].T  # (k, d_in)
    return LoraFactors(A=A.float(), B=B.float(), scale=1.0)


def pad_rank(f: LoraFactors, rank: int) -> LoraFactors:
    """The same ΔW with zero rows/columns appended up to ``rank``, scale folded into A."""
    if rank < f.rank:
        raise ValueError(f"rank {rank} is below the factors' rank {f.rank}")
    pad = rank - f.rank
    A = f.scale * f.A.float()
    A = torch.cat([A, A.new_zeros(pad, A.shape[1])], dim=0)  # (rank, d_in)
    B = torch.cat([f.B.float(), f.B.new_zeros(f.B.shape[0], pad).float()], dim=1)  # (d_out, rank)
    return LoraFactors(A=A, B=B, scale=1.0)


def orthonormal_basis(M: torch.Tensor, rtol: float = 1e-6) -> torch.Tensor:
    """Orthonormal basis (d, k) of the column space of M (d, r); directions below rtol dropped."""
    U, S, _ = torch.linalg.svd(M.to(_ACC), full_matrices=False)  # (d, r), (r,)
    return U[:, : nonzero_directions(S, rtol)]


def principal_cosines(
    M1: torch.Tensor, M2: torch.Tensor, orthonormal: bool = False
) -> torch.Tensor:
    """Cosines of the principal angles between the column spaces of M1 (d, r1) and M2 (d, r2).

    With orthonormal bases Q1, Q2 they are the singular values of Q1ᵀQ2, descending, at most
    min(rank1, rank2) of them (empty when either space is {0}). ``orthonormal``: M1 and M2
    already are such bases (e.g. from `orthonormal_basis`), so they are used as they are.
    """
    Q1, Q2 = (M1, M2) if orthonormal else (orthonormal_basis(M1), orthonormal_basis(M2))
    if Q1.shape[1] == 0 or Q2.shape[1] == 0:
        return torch.zeros(0, dtype=_ACC)
    return torch.linalg.svdvals(Q1.to(_ACC).T @ Q2.to(_ACC)).clamp(0.0, 1.0)  # (min(k1, k2),)
