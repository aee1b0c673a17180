"""Activation-space predictors: interference predicted before composing, from LoRA factors and
the domains' input Gram matrices (needs adapters and calibration).

For adapters i, j, a module m with ΔW = s·B·A, and domain i's per-token input Gram matrix
Ĝ_i = (1/n_i) X_i X_iᵀ at m (`lorasum.analysis.calibration`):

- **cosine** ⟨ΔW_i, ΔW_j⟩_F / ‖ΔW_i‖‖ΔW_j‖ and its RMS over shared modules (the paper's
  predictor, as in `lorasum.analysis.similarity`): blind to which inputs the deltas see;
- **activation cosine** tr(ΔW_i G ΔW_jᵀ) / √(tr(ΔW_i G ΔW_iᵀ) · tr(ΔW_j G ΔW_jᵀ)) with
  G = Ĝ_i + Ĝ_j: the cosine of the two deltas' *outputs* on both domains' inputs
  (⟨ΔW_i X, ΔW_j X⟩ over X = [X_i/√n_i, X_j/√n_j]); per module, its RMS over shared modules,
  and a global value (numerators and denominators summed over modules);
- **cross-talk** κ_{j→i} = ‖ΔW_j X_i‖²_F / ‖ΔW_i X_i‖²_F = tr(ΔW_j Ĝ_i ΔW_jᵀ) /
  tr(ΔW_i Ĝ_i ΔW_iᵀ): how much adapter j writes on domain i's inputs, relative to what
  domain i's own adapter writes there. Directional. Aggregated over modules as a ratio of sums
  (total output energy of j on i's inputs over i's own), per module where ΔW_i ≠ 0;
- its split κ_{j→i} = β² + κ⊥ (this project's, for "what differs" when κ ≈ 1 everywhere):
  **overshoot** β_{j→i} = ⟨ΔW_j X_i, ΔW_i X_i⟩ / ‖ΔW_i X_i‖², the share of domain i's own
  output shift that adapter j repeats (the sum applies it 1 + β times: a shared answer format
  learned twice), and **orthogonal cross-talk** κ⊥ = κ − β², output on domain i's inputs
  that domain i's adapter does not write at all. Combination level: mean β, max and mean κ⊥.

`interference_predictors` gives them per pair and per module (`lorasum predict` prints them,
`lorasum.analysis.predict`), `combination_predictors` per combination; `ACTIVATION` is the
registered family (the study's per-seed predictors unit).

Every trace is taken on r×r cores, never a d_out×d_in matrix:

    tr(s_i B_i A_i G A_jᵀ B_jᵀ s_j) = s_i s_j · Σ (B_iᵀ B_j) ∘ (A_i G A_jᵀ)

(B_iᵀB_j: r_i×r_j; A_i G A_jᵀ: r_i×r_j from an r_i×d_in by d_in×d_in product), in float64.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence

import torch

from lorasum.analysis.predictors.registry import Predictor, PredictorFamily, PredictorInputs
from lorasum.data.sources import combo_name
from lorasum.errors import LorasumError
from lorasum.factors import Factors, LoraFactors, module_cosines, rms, single_threaded

_ACC = torch.float64


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
    return {n: g.per_token() if hasattr(g, "per_token") else g for n, g in grams.items()}


class _Products:
    """A_i Ĝ_k (r_i, d_in) per (adapter, domain, module), each computed once: every trace of
    the predictors is then an r×r product, and G = Ĝ_a + Ĝ_b is never formed. Keeps the
    matrices it was given alive (ids stay unique): one per module in `interference_predictors`."""

    def __init__(self):
        self._memo: dict[tuple[int, int, str], torch.Tensor] = {}

    def __call__(self, f: LoraFactors, G: torch.Tensor, module: str) -> torch.Tensor:
        key = (id(f), id(G), module)
        if key not in self._memo:
            self._memo[key] = (f.A.to(_ACC) @ G.to(_ACC), f, G)  # keep f, G: ids stay unique
        return self._memo[key][0]

    def inner(self, f1: LoraFactors, f2: LoraFactors, Gs: Sequence[torch.Tensor], module: str):
        """tr(ΔW_1 (Σ Gs) ΔW_2ᵀ) = s1·s2·Σ (B1ᵀB2) ∘ (Σ_G A1 G A2ᵀ)."""
        core_b = f1.B.to(_ACC).T @ f2.B.to(_ACC)  # (r1, r2)
        core_a = sum(self(f1, G, module) @ f2.A.to(_ACC).T for G in Gs)  # (r1, r2)
        return float(f1.scale * f2.scale * (core_b * core_a).sum())


def _split_cross_talk(direction: str, energy: float, shared: float, own: float) -> dict:
    """κ = β² + κ⊥: the other adapter's output on these inputs, split into the part along the
    own adapter's output (β = ⟨ΔW_j X_i, ΔW_i X_i⟩ / ‖ΔW_i X_i‖², the share of the own shift
    that the sum applies a second time: overshoot) and the part orthogonal to it (κ⊥, output
    the domain never asked for), all over the concatenated modules."""
    if own <= 0:
        return {f"overshoot_{direction}": None, f"orthogonal_cross_talk_{direction}": None}
    beta = shared / own
    return {
        f"overshoot_{direction}": beta,
        f"orthogonal_cross_talk_{direction}": max(energy / own - beta * beta, 0.0),
    }


def _module_row(fa: LoraFactors | None, fb: LoraFactors | None, Ga, Gb, products, m) -> dict:
    """One module's output energies of a pair (per-token Ĝ of a's and b's domains)."""
    row: dict = {}
    own_a = products.inner(fa, fa, [Ga], m) if fa is not None else 0.0
    own_b = products.inner(fb, fb, [Gb], m) if fb is not None else 0.0
    b_on_a = products.inner(fb, fb, [Ga], m) if fb is not None else 0.0
    a_on_b = products.inner(fa, fa, [Gb], m) if fa is not None else 0.0
    # ⟨ΔW_b X_a, ΔW_a X_a⟩ and ⟨ΔW_a X_b, ΔW_b X_b⟩: how much of the own shift the other repeats
    both = fa is not None and fb is not None
    shared_a = products.inner(fa, fb, [Ga], m) if both else 0.0
    shared_b = products.inner(fa, fb, [Gb], m) if both else 0.0
    row["energy_b_to_a"], row["energy_own_a"] = b_on_a, own_a  # ‖ΔW_b X_a‖², ‖ΔW_a X_a‖²
    row["energy_a_to_b"], row["energy_own_b"] = a_on_b, own_b
    row["shared_b_to_a"], row["shared_a_to_b"] = shared_a, shared_b
    row["cross_talk_b_to_a"] = b_on_a / own_a if own_a > 0 else None
    row["cross_talk_a_to_b"] = a_on_b / own_b if own_b > 0 else None
    if both:
        num = shared_a + shared_b  # tr(ΔW_a (Ĝ_a + Ĝ_b) ΔW_bᵀ)
        da = own_a + a_on_b  # tr(ΔW_a (Ĝ_a + Ĝ_b) ΔW_aᵀ)
        db = b_on_a + own_b
        row["activation_cosine"] = (
            max(-1.0, min(1.0, num / math.sqrt(da * db))) if da > 0 and db > 0 else 0.0
        )
    return row


def _pair_summary(a: Factors, b: Factors, modules: dict[str, dict]) -> dict:
    """A pair's predictors from its per-module rows (`_module_row`), summed over modules."""
    shared = sorted(a.keys() & b.keys())

    def total(field: str, among=None) -> float:
        return sum(modules[m][field] for m in (among if among is not None else modules))

    # cross-talk sums: [b on a's inputs, a's own on a's inputs], and the other way round
    ba_num, ba_den = total("energy_b_to_a"), total("energy_own_a")
    ab_num, ab_den = total("energy_a_to_b"), total("energy_own_b")
    ba_shared, ab_shared = total("shared_b_to_a"), total("shared_a_to_b")
    act_num = total("shared_b_to_a", shared) + total("shared_a_to_b", shared)
    act_den_a = total("energy_own_a", shared) + total("energy_a_to_b", shared)
    act_den_b = total("energy_b_to_a", shared) + total("energy_own_b", shared)
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
        **_split_cross_talk("b_to_a", ba_num, ba_shared, ba_den),
        **_split_cross_talk("a_to_b", ab_num, ab_shared, ab_den),
        "modules": modules,
    }


def pair_predictors(
    a: Factors,
    b: Factors,
    grams_a: Mapping[str, torch.Tensor],
    grams_b: Mapping[str, torch.Tensor],
    names: tuple[str, str] = ("a", "b"),
) -> dict:
    """Every predictor for one pair, per module and aggregated (grams: per-token Ĝ)."""
    products = _Products()
    rows = {}
    for m in sorted(a.keys() | b.keys()):
        Ga, Gb = _gram(grams_a, names[0], m), _gram(grams_b, names[1], m)
        rows[m] = _module_row(a.get(m), b.get(m), Ga, Gb, products, m)
    return _pair_summary(a, b, rows)


def interference_predictors(adapters: Mapping[str, Factors], grams: Mapping[str, object]) -> dict:
    """Interference predictors for every pair of named adapters, before composing.

    ``adapters``: name -> factors; ``grams``: name -> that adapter's domain statistics, either
    a `lorasum.analysis.calibration.Calibration` or module -> per-token Gram matrix Ĝ (a mapping that
    reads each matrix on access, `Calibration.per_token(from_file=True)`, keeps memory to one
    module's matrices: the work goes module by module, each Ĝ read once). Returns

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
    over = [[1.0 if i == j else None for j in range(size)] for i in range(size)]
    ortho = [[0.0 if i == j else None for j in range(size)] for i in range(size)]
    combos = list(itertools.combinations(names, 2))
    rows: dict[tuple[str, str], dict[str, dict]] = {c: {} for c in combos}
    every = sorted(set().union(*(adapters[n].keys() for n in names)))
    with single_threaded():
        for m in every:  # one module's Ĝ of each domain at a time, read once
            loaded: dict[str, torch.Tensor] = {}

            def gram(n: str, m: str = m, loaded=loaded) -> torch.Tensor:
                if n not in loaded:
                    loaded[n] = _gram(norm[n], n, m)
                return loaded[n]

            products = _Products()
            for na, nb in combos:
                fa, fb = adapters[na].get(m), adapters[nb].get(m)
                if fa is not None or fb is not None:
                    rows[na, nb][m] = _module_row(fa, fb, gram(na), gram(nb), products, m)
        pairs = []
        for na, nb in combos:
            p = _pair_summary(adapters[na], adapters[nb], rows[na, nb])
            i, j = index[na], index[nb]
            cos[i][j] = cos[j][i] = p["rms_cosine"]
            act[i][j] = act[j][i] = p["rms_activation_cosine"]
            talk[i][j] = p["cross_talk_b_to_a"]  # adapter b on a's inputs
            talk[j][i] = p["cross_talk_a_to_b"]
            over[i][j], over[j][i] = p["overshoot_b_to_a"], p["overshoot_a_to_b"]
            ortho[i][j] = p["orthogonal_cross_talk_b_to_a"]
            ortho[j][i] = p["orthogonal_cross_talk_a_to_b"]
            pairs.append({"a": na, "b": nb, **p})
    off = [talk[i][j] for i in range(size) for j in range(size) if i != j]
    off = [v for v in off if v is not None]
    return {
        "names": names,
        "rms_cosine": cos,
        "rms_activation_cosine": act,
        "cross_talk": talk,
        "overshoot": over,
        "orthogonal_cross_talk": ortho,
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

    def off(key: str) -> list[float]:
        values = [
            result.get(key, [[None] * len(index)] * len(index))[i][j]
            for i in idx
            for j in idx
            if i != j
        ]
        return [v for v in values if v is not None]

    talk, over, ortho = off("cross_talk"), off("overshoot"), off("orthogonal_cross_talk")
    return {
        "rms_cosine": rms([result["rms_cosine"][i][j] for i, j in pairs]),
        "rms_activation_cosine": rms([result["rms_activation_cosine"][i][j] for i, j in pairs]),
        "max_cross_talk": max(talk) if talk else None,
        "mean_cross_talk": sum(talk) / len(talk) if talk else None,
        "mean_overshoot": sum(over) / len(over) if over else None,
        "max_orthogonal_cross_talk": max(ortho) if ortho else None,
        "mean_orthogonal_cross_talk": sum(ortho) / len(ortho) if ortho else None,
    }


def compute_activation(inputs: PredictorInputs, combos) -> dict[str, dict[str, float | None]]:
    """The family's predictors of every combination: one pass over each module's Ĝ for all
    the domains' adapters (``inputs.adapters``, ``inputs.grams``)."""
    result = interference_predictors(inputs.adapters, inputs.grams)
    names = ACTIVATION.names
    out = {}
    for combo in combos:
        values = combination_predictors(result, combo)
        out[combo_name(combo)] = {k: v for k, v in values.items() if k in names}
    return out


ACTIVATION = PredictorFamily(
    name="activation",
    predictors=(
        Predictor("rms_activation_cosine", "RMS activation-weighted cosine of the ΔW"),
        Predictor("max_cross_talk", "max cross-talk"),
        Predictor("mean_cross_talk", "mean cross-talk"),
        Predictor("mean_overshoot"),
        Predictor("max_orthogonal_cross_talk"),
        Predictor("mean_orthogonal_cross_talk"),
    ),
    needs=frozenset({"adapters", "calibration"}),
    compute=compute_activation,
    summary="the adapters' outputs on each other's domain inputs: activation cosine, "
    "cross-talk κ = overshoot β² + orthogonal κ⊥",
)
