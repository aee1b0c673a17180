"""`lora_lego`: LoRA-LEGO, rank-wise clustering of the adapters' rank-one units.

Zhao, Shen, Zhu, Li, Su, Wang, Kuang, Wu, "Merging LoRAs like Playing LEGO: Pushing the
Modularity of LoRA to Extremes Through Rank-Wise Clustering", ICLR 2025, arXiv 2409.16167.

Only the abstract and summaries of the paper could be read here (not its method section or
code), so this is our reading, stated exactly:

1. Minimal semantic units (MSUs): every rank j of every adapter i that adapts the module is one
   unit (b_ij, a_ij) = (column j of B_i, row j of A_i), with ΔW_i = Σ_j b_ij a_ijᵀ after the
   adapter's scale and weight c_i = w_i·s_i are folded in, split evenly between the two
   halves: a_ij ← sign(c_i)·√|c_i|·a_ij, b_ij ← √|c_i|·b_ij (with equal scales this is the
   paper's raw [a, b] up to one common factor, which k-means and the merge do not notice);
2. the feature of a unit is the concatenation x_ij = [a_ij, b_ij] (d_in + d_out);
3. k-means into K clusters, K = ``--rank`` (default: the largest rank among the inputs), by
   ``scipy.cluster.vq.kmeans2`` (k-means++ initialisation, 10 iterations, its default
   threshold) on float64 features, seeded by (``--seed``, module name) as `dare_*` seeds its
   masks: the same seed gives the same result. With at most K units, every unit is its own
   cluster (no clustering: the result is the exact weighted sum);
4. each non-empty cluster's centroid (the mean of its units' x) is one unit of the merged
   adapter, so the result has rank = the number of non-empty clusters ≤ K;
5. parameter reweighting (the paper's fix for "norm decay": averaging units that point in
   different directions shrinks the norm): each centroid is rescaled to the mean norm of its
   cluster's units, x̄ ← x̄ · mean‖x_ij‖ / ‖x̄‖ (a zero centroid stays zero).

The paper also names an "output reweighting" against "variance expansion"; its rule could not
be read, so none is applied (with the default K = max rank and equal input ranks the merged
adapter has the inputs' rank, where such a rank-based correction would be 1).

Weights: optional (default 1), folded into the units in step 1, so they act before the
clustering. Factored: k-means on N = Σr_i vectors of length d_in + d_out; no d_out×d_in matrix.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from lorasum.errors import LorasumError
from lorasum.factors import LoraFactors
from lorasum.methods.dare import module_seed
from lorasum.methods.options import RANK, SEED
from lorasum.methods.registry import MergeMethod, ModuleMerge

if TYPE_CHECKING:
    from lorasum.methods.config import MergeConfig


def unit_features(terms: Sequence[LoraFactors | None], weights: Sequence[float]) -> torch.Tensor:
    """Every rank-one unit as a row [a, b] (N, d_in + d_out), float64, scale split evenly."""
    rows = []
    for t, w in zip(terms, weights, strict=True):
        if t is None:
            continue
        c = w * t.scale
        root = math.sqrt(abs(c))
        a = math.copysign(root, c) * t.A.double()  # (r, d_in)
        b = root * t.B.double().T  # (r, d_out)
        rows.append(torch.cat([a, b], dim=1))
    return torch.cat(rows, dim=0)


def cluster_labels(features: torch.Tensor, k: int, seed: int) -> np.ndarray:
    """k-means labels (N,) of the rows; every row its own cluster when N ≤ k."""
    from scipy.cluster.vq import kmeans2

    n = features.shape[0]
    if n <= k:
        return np.arange(n)
    with warnings.catch_warnings():
        # an empty cluster only lowers the merged rank (step 4); scipy warns about it
        warnings.filterwarnings("ignore", message="One of the clusters is empty")
        _, labels = kmeans2(features.numpy(), k, minit="++", rng=np.random.default_rng(seed))
    return labels


def reweighted_centroids(features: torch.Tensor, labels: np.ndarray) -> torch.Tensor:
    """Per non-empty cluster (ascending label): mean row rescaled to the members' mean norm."""
    out = []
    for label in np.unique(labels):
        members = features[torch.from_numpy(labels == label)]  # (n_c, D)
        centroid = members.mean(dim=0)  # (D,)
        norm = float(centroid.norm())
        target = float(members.norm(dim=1).mean())
        out.append(centroid * (target / norm) if norm > 0.0 else centroid)
    return torch.stack(out)  # (K', D)


def merge_lora_lego(
    terms: Sequence[LoraFactors | None],
    weights: Sequence[float],
    config: MergeConfig,
    module: str,
) -> ModuleMerge:
    rank = config.option("rank")
    if rank == "auto":
        raise LorasumError("--method lora_lego needs an integer --rank (the number of clusters)")
    present = [t for t in terms if t is not None]
    k = int(rank) if rank is not None else max(t.rank for t in present)
    d_in = present[0].shape[1]
    features = unit_features(terms, weights)  # (N, d_in + d_out)
    labels = cluster_labels(features, k, module_seed(config.option("seed"), module))
    units = reweighted_centroids(features, labels)  # (K', d_in + d_out)
    A, B = units[:, :d_in], units[:, d_in:].T  # (K', d_in), (d_out, K')
    return ModuleMerge(
        LoraFactors(A=A.float(), B=B.float(), scale=1.0),
        details={"lego_units": features.shape[0], "lego_clusters": units.shape[0]},
    )


LORA_LEGO = MergeMethod(
    name="lora_lego",
    merge=merge_lora_lego,
    summary="LoRA-LEGO: k-means of all rank-one units [a, b] into --rank clusters, centroids "
    "rescaled to their members' mean norm",
    options=(RANK, SEED),
    notes={
        "rank": "the number of clusters (an integer, default the largest input rank)",
        "seed": "of the k-means initialisation",
    },
)
