"""`regmean`, `regmean_rescaled`: RegMean on LoRA deltas, in factored form.

Jin, Ren, Preotiuc-Pietro, Cheng, "Dataless Knowledge Fusion by Merging Weights of Language
Models", ICLR 2023, arXiv 2212.09849. Per linear module, RegMean picks the W minimising
Σ_i ‖W X_i − W_i X_i‖²_F over each task's inputs X_i (d_in, n_i):

    W* = (Σ_i W_i G_i)(Σ_j G_j)⁻¹,     G_i = X_i X_iᵀ.

With W_i = W_0 + ΔW_i this is W_0 + ΔW*, ΔW* = (Σ_i ΔW_i G_i) M⁻¹, M = Σ_j G_j, so it applies
to the deltas alone. Our reading, for one module with N adapters:

- G_i = Ĝ_i, adapter i's **per-token** input Gram matrix (`lorasum.analysis.calibration`: Σ x xᵀ / n
  over its domain's non-padding tokens, base model inputs), so every domain weighs the same
  whatever the size of its data (the paper sums over examples);
- off-diagonals shrunk as in the paper: Ĝ_i ← α·Ĝ_i + (1 − α)·diag(Ĝ_i), α =
  ``--regmean-alpha`` (default 0.9), in numerator and M alike;
- a ridge for invertibility: M = Σ_j Ĝ_j + λI with λ = 1e-6 · tr(Σ_j Ĝ_j);
- an adapter that does not adapt the module has ΔW_i = 0, but its Ĝ_i still enters M (its
  domain wants the base weights there).

Factored: ΔW* = Σ_i s_i B_i (A_i Ĝ_i M⁻¹) is a LoRA of rank Σr_i with
B = [B_1 … B_N] and A = [s_1 A_1 Ĝ_1 M⁻¹; …], A_i Ĝ_i M⁻¹ = (M⁻¹ Ĝ_i A_iᵀ)ᵀ by a Cholesky
solve: d_in×d_in work only, never d_out×d_in. ``--rank`` truncates it (factored SVD).

Properties (tested): identical Ĝ_i give the mean (1/N) Σ ΔW_i; Ĝ_i on disjoint input
subspaces, with each ΔW_i reading only its own subspace, give the sum. `regmean_rescaled` is
N·ΔW*: the sum where all domains' inputs coincide, N× the sum where they are disjoint.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING

import torch

from lorasum.factors import LoraFactors, factored_svd
from lorasum.methods.lowrank import truncate
from lorasum.methods.options import KEEP, RANK, Option, in_closed_unit_interval
from lorasum.methods.registry import MergeMethod, ModuleMerge

if TYPE_CHECKING:
    from lorasum.methods.config import MergeConfig

RIDGE = 1e-6  # λ relative to tr(M)
REGMEAN_ALPHA = Option(
    "regmean_alpha",
    float,
    0.9,
    "off-diagonal shrinkage of each input Gram matrix, G ← α·G + (1−α)·diag(G), in [0, 1], "
    "as in the paper",
    check=in_closed_unit_interval,
)


def shrink(G: torch.Tensor, alpha: float) -> torch.Tensor:
    """α·G + (1 − α)·diag(G), float64 (d_in, d_in)."""
    G = G.double()
    return alpha * G + (1.0 - alpha) * torch.diag(torch.diagonal(G))


def with_ridge(M: torch.Tensor, ridge: float = RIDGE) -> torch.Tensor:
    """M + λI with λ = ridge · tr(M) (and a floor for an all-zero M).

    Relative to the trace, not the mean diagonal: Gram matrices of real activations are often
    rank-deficient (few distinct inputs), and their fp32 rounding (~1e-7 of the largest
    eigenvalue ≤ tr) must not leave M indefinite.
    """
    trace = float(torch.diagonal(M).sum()) if M.numel() else 0.0
    lam = ridge * trace if trace > 0 else 1e-12
    return M + lam * torch.eye(M.shape[0], dtype=M.dtype)


class GramCache:
    """A few results computed from one tuple of Gram matrices, found again by the matrices'
    identity: modules that read one input (q/k/v) get the very same Ĝ objects from
    `lorasum.analysis.calibration.Calibration.normalised`, so their d_in×d_in factorisations are done
    once. An entry holds references to its matrices, so an id cannot be reused while it lives;
    a hit also checks identity (``is``), never values. Least recently used entries go first.
    Each thread has its own entries (`merge_adapters` gives every input group to one thread),
    so threads neither race on the entries nor evict each other's.
    """

    def __init__(self, size: int = 4):
        self.size = size
        self._local = threading.local()

    @property
    def _entries(self) -> OrderedDict[tuple, tuple[tuple[torch.Tensor, ...], object]]:
        entries = getattr(self._local, "entries", None)
        if entries is None:
            entries = self._local.entries = OrderedDict()
        return entries

    def get(self, grams: Sequence[torch.Tensor], extra: Hashable, compute: Callable[[], object]):
        entries = self._entries
        key = (tuple(id(g) for g in grams), extra)
        hit = entries.get(key)
        if hit is not None and all(a is b for a, b in zip(hit[0], grams, strict=True)):
            entries.move_to_end(key)
            return hit[1]
        value = compute()
        entries[key] = (tuple(grams), value)
        while len(entries) > self.size:
            entries.popitem(last=False)
        return value

    def clear(self) -> None:
        """Drop this thread's entries."""
        self._entries.clear()


_FACTORED = GramCache()  # module order per layer is down, k, o, q, v: 4 entries suffice


def regmean_system(grams: Sequence[torch.Tensor], alpha: float) -> tuple[torch.Tensor, list]:
    """L with L Lᵀ = M = Σ_j shrink(Ĝ_j) + λI, and each Ĝ_j's diagonal, float64.

    shrink is linear, so M = α S + (1 − α) diag(S) with S = Σ_j Ĝ_j: one d_in×d_in sum, no
    shrunk copy per adapter (the numerators use Ĝ_j and its diagonal, see `regmean_stacked`).
    """
    M = grams[0].double().clone()  # (d_in, d_in)
    for g in grams[1:]:
        M += g
    diag = torch.diagonal(M).clone()
    M *= alpha
    torch.diagonal(M).add_((1.0 - alpha) * diag)
    trace = float(diag.sum()) if M.numel() else 0.0
    torch.diagonal(M).add_(RIDGE * trace if trace > 0 else 1e-12)  # = with_ridge(M)
    return torch.linalg.cholesky(M), [torch.diagonal(g).double() for g in grams]


def regmean_stacked(
    terms: Sequence[LoraFactors | None],
    weights: Sequence[float],
    grams: Sequence[torch.Tensor],
    alpha: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ΔW* = (Σ_i w_i ΔW_i Ĝ_i) M⁻¹ as stacked factors B (d_out, Σr), A (Σr, d_in), float64."""
    L, diags = _FACTORED.get(grams, ("regmean", alpha), lambda: regmean_system(grams, alpha))
    Bs, As = [], []
    for t, w, G, diag in zip(terms, weights, grams, diags, strict=True):
        if t is None:
            continue
        A = (w * t.scale) * t.A.double()  # (r, d_in)
        shrunk_At = alpha * (G.double() @ A.T) + (1.0 - alpha) * diag[:, None] * A.T  # shrink(Ĝ) Aᵀ
        As.append(torch.cholesky_solve(shrunk_At, L).T)  # (r, d_in) = A shrink(Ĝ) M⁻¹
        Bs.append(t.B.double())  # (d_out, r)
    return torch.cat(Bs, dim=1), torch.cat(As, dim=0)


def lora_result(B: torch.Tensor, A: torch.Tensor, config: MergeConfig) -> ModuleMerge:
    if config.option("rank") is None:  # the exact result, rank Σr
        return ModuleMerge(LoraFactors(A=A.float(), B=B.float(), scale=1.0))
    return truncate(factored_svd(B, A), config.option("rank"), config.option("keep"), B.shape[1])


def merge_regmean(
    terms: Sequence[LoraFactors | None],
    weights: Sequence[float],
    config: MergeConfig,
    module: str,
    grams: Sequence[torch.Tensor],
) -> ModuleMerge:
    B, A = regmean_stacked(terms, weights, grams, config.option("regmean_alpha"))
    return lora_result(B, A, config)


def merge_regmean_rescaled(
    terms: Sequence[LoraFactors | None],
    weights: Sequence[float],
    config: MergeConfig,
    module: str,
    grams: Sequence[torch.Tensor],
) -> ModuleMerge:
    B, A = regmean_stacked(terms, weights, grams, config.option("regmean_alpha"))
    return lora_result(B, len(terms) * A, config)


REGMEAN = MergeMethod(
    name="regmean",
    merge=merge_regmean,
    summary="RegMean: (Σ ΔW_i Ĝ_i)(Σ Ĝ_j)⁻¹ with per-token input Grams (needs calibration)",
    options=(REGMEAN_ALPHA, RANK, KEEP),
    notes={"rank": "default Σr (exact)"},
    weights="refused",
    calibration=True,
)
REGMEAN_RESCALED = MergeMethod(
    name="regmean_rescaled",
    merge=merge_regmean_rescaled,
    summary="N × RegMean: the sum where domains' inputs coincide (needs calibration)",
    options=(REGMEAN_ALPHA, RANK, KEEP),
    notes={"rank": "default Σr (exact)"},
    weights="refused",
    calibration=True,
)
