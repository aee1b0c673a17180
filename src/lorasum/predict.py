"""Interference predicted before composing, from LoRA factors and input Gram matrices.

For adapters i, j, a module m with ΔW = s·B·A, and domain i's per-token input Gram matrix
Ĝ_i = (1/n_i) X_i X_iᵀ at m (`lorasum.calibration`):

- **cosine** ⟨ΔW_i, ΔW_j⟩_F / ‖ΔW_i‖‖ΔW_j‖ and its RMS over shared modules (the paper's
  predictor, as in `lorasum.similarity`): blind to which inputs the deltas see;
- **activation cosine** tr(ΔW_i G ΔW_jᵀ) / √(tr(ΔW_i G ΔW_iᵀ) · tr(ΔW_j G ΔW_jᵀ)) with
  G = Ĝ_i + Ĝ_j: the cosine of the two deltas' *outputs* on both domains' inputs
  (⟨ΔW_i X, ΔW_j X⟩ over X = [X_i/√n_i, X_j/√n_j]); per module, its RMS over shared modules,
  and a global value (numerators and denominators summed over modules);
- **cross-talk** κ_{j→i} = ‖ΔW_j X_i‖²_F / ‖ΔW_i X_i‖²_F = tr(ΔW_j Ĝ_i ΔW_jᵀ) /
  tr(ΔW_i Ĝ_i ΔW_iᵀ): how much adapter j writes on domain i's inputs, relative to what
  domain i's own adapter writes there. Directional. Aggregated over modules as a ratio of sums
  (total output energy of j on i's inputs over i's own), per module where ΔW_i ≠ 0.

Every trace is taken on r×r cores, never a d_out×d_in matrix:

    tr(s_i B_i A_i G A_jᵀ B_jᵀ s_j) = s_i s_j · Σ (B_iᵀ B_j) ∘ (A_i G A_jᵀ)

(B_iᵀB_j: r_i×r_j; A_i G A_jᵀ: r_i×r_j from an r_i×d_in by d_in×d_in product), in float64.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence

import torch

from lorasum.errors import LorasumError
from lorasum.factors import Factors, LoraFactors, module_cosines, rms, single_threaded

_ACC = torch.float64


def activation_inner(f1: LoraFactors, f2: LoraFactors, G: torch.Tensor) -> float:
    """tr(ΔW_1 G ΔW_2ᵀ) from the factors: s1·s2·Σ (B1ᵀB2) ∘ (A1 G A2ᵀ)."""
    core_b = f1.B.to(_ACC).T @ f2.B.to(_ACC)  # (r1, r2)
    core_a = f1.A.to(_ACC) @ G.to(_ACC) @ f2.A.to(_ACC).T  # (r1, r2)
    return float(f1.scale * f2.scale * (core_b * core_a).sum())


def _gram(grams: Mapping[str, torch.Tensor], name: str, module: str) -> torch.Tensor:
    try:
        return grams[module]
    except KeyError:
        raise LorasumError(
            f"no input statistics of {name}'s domain at module {module}; calibrate every "
            "adapter on the union of the adapters' modules"
        ) from None


def _normalised(grams) -> dict[str, Mapping[str, torch.Tensor]]:
    """Accept Calibration objects (raw sums) or ready per-token Gram matrices."""
    return {n: g.normalised() if hasattr(g, "normalised") else g for n, g in grams.items()}


def pair_predictors(
    a: Factors,
    b: Factors,
    grams_a: Mapping[str, torch.Tensor],
    grams_b: Mapping[str, torch.Tensor],
    names: tuple[str, str] = ("a", "b"),
) -> dict:
    """Every predictor for one pair, per module and aggregated (grams: per-token Ĝ)."""
    every = sorted(a.keys() | b.keys())
    shared = sorted(a.keys() & b.keys())
    modules: dict[str, dict] = {}
    act_num = act_den_a = act_den_b = 0.0
    # cross-talk sums: [b on a's inputs, a's own on a's inputs], and the other way round
    ba_num = ba_den = ab_num = ab_den = 0.0
    for m in every:
        row: dict = {}
        fa, fb = a.get(m), b.get(m)
        Ga, Gb = _gram(grams_a, names[0], m), _gram(grams_b, names[1], m)
        own_a = activation_inner(fa, fa, Ga) if fa is not None else 0.0
        own_b = activation_inner(fb, fb, Gb) if fb is not None else 0.0
        b_on_a = activation_inner(fb, fb, Ga) if fb is not None else 0.0
        a_on_b = activation_inner(fa, fa, Gb) if fa is not None else 0.0
        ba_num, ba_den = ba_num + b_on_a, ba_den + own_a
        ab_num, ab_den = ab_num + a_on_b, ab_den + own_b
        row["cross_talk_b_to_a"] = b_on_a / own_a if own_a > 0 else None
        row["cross_talk_a_to_b"] = a_on_b / own_b if own_b > 0 else None
        if fa is not None and fb is not None:
            G = Ga + Gb  # (d_in, d_in)
            num = activation_inner(fa, fb, G)
            da, db = activation_inner(fa, fa, G), activation_inner(fb, fb, G)
            act_num, act_den_a, act_den_b = act_num + num, act_den_a + da, act_den_b + db
            row["activation_cosine"] = (
                max(-1.0, min(1.0, num / math.sqrt(da * db))) if da > 0 and db > 0 else 0.0
            )
        modules[m] = row
    cos = module_cosines(a, b)
    for m, c in cos.items():
        modules[m]["cosine"] = c
    act = [modules[m]["activation_cosine"] for m in shared]
    return {
        "rms_cosine": rms(list(cos.values())),
        "rms_activation_cosine": rms(act),
        "global_activation_cosine": (
            act_num / math.sqrt(act_den_a * act_den_b) if act_den_a > 0 and act_den_b > 0 else 0.0
        ),
        "cross_talk_b_to_a": ba_num / ba_den if ba_den > 0 else None,
        "cross_talk_a_to_b": ab_num / ab_den if ab_den > 0 else None,
        "modules": modules,
    }


def interference_predictors(adapters: Mapping[str, Factors], grams: Mapping[str, object]) -> dict:
    """Interference predictors for every pair of named adapters, before composing.

    ``adapters``: name -> factors; ``grams``: name -> that adapter's domain statistics, either
    a `lorasum.calibration.Calibration` or module -> per-token Gram matrix Ĝ. Returns

    - ``pairs``: per unordered pair {a, b, rms_cosine, rms_activation_cosine,
      global_activation_cosine, cross_talk_b_to_a, cross_talk_a_to_b, modules: {module: …}};
    - ``names`` and N×N matrices ``rms_cosine``, ``rms_activation_cosine`` (1 on the
      diagonal) and ``cross_talk`` (row i = domain i's inputs, column j = adapter j:
      κ_{j→i}; 1 on the diagonal);
    - ``max_cross_talk`` and ``mean_cross_talk``: over the off-diagonal entries (None for one
      adapter).
    """
    names = list(adapters)
    missing = [n for n in names if n not in grams]
    if missing:
        raise LorasumError(f"no input statistics for {', '.join(missing)}; calibrate them first")
    norm = _normalised({n: grams[n] for n in names})
    index = {n: i for i, n in enumerate(names)}
    size = len(names)
    cos = [[1.0 if i == j else None for j in range(size)] for i in range(size)]
    act = [[1.0 if i == j else None for j in range(size)] for i in range(size)]
    talk = [[1.0 if i == j else None for j in range(size)] for i in range(size)]
    pairs = []
    with single_threaded():
        for na, nb in itertools.combinations(names, 2):
            p = pair_predictors(adapters[na], adapters[nb], norm[na], norm[nb], (na, nb))
            i, j = index[na], index[nb]
            cos[i][j] = cos[j][i] = p["rms_cosine"]
            act[i][j] = act[j][i] = p["rms_activation_cosine"]
            talk[i][j] = p["cross_talk_b_to_a"]  # adapter b on a's inputs
            talk[j][i] = p["cross_talk_a_to_b"]
            pairs.append({"a": na, "b": nb, **p})
    off = [talk[i][j] for i in range(size) for j in range(size) if i != j]
    off = [v for v in off if v is not None]
    return {
        "names": names,
        "rms_cosine": cos,
        "rms_activation_cosine": act,
        "cross_talk": talk,
        "max_cross_talk": max(off) if off else None,
        "mean_cross_talk": sum(off) / len(off) if off else None,
        "pairs": pairs,
    }


def combination_predictors(result: dict, names: Sequence[str]) -> dict:
    """Predictors of one combination of adapters from `interference_predictors`' result.

    RMS over its pairs of the (RMS) cosines, and for cross-talk the largest and the mean
    κ_{j→i} over ordered pairs within the combination.
    """
    index = {n: i for i, n in enumerate(result["names"])}
    idx = [index[n] for n in names]
    pairs = list(itertools.combinations(idx, 2))
    talk = [result["cross_talk"][i][j] for i in idx for j in idx if i != j]
    talk = [v for v in talk if v is not None]
    return {
        "rms_cosine": rms([result["rms_cosine"][i][j] for i, j in pairs]),
        "rms_activation_cosine": rms([result["rms_activation_cosine"][i][j] for i, j in pairs]),
        "max_cross_talk": max(talk) if talk else None,
        "mean_cross_talk": sum(talk) / len(talk) if talk else None,
    }
