"""How alike LoRA adapters are, in factored form (never a d_out×d_in matrix).

- cosine of ΔW per shared module (⟨ΔW₁, ΔW₂⟩_F / ‖ΔW₁‖‖ΔW₂‖ from the r×r cores), its RMS over
  modules, and the whole-adapter cosine (all modules as one vector), for every pair: an N×N
  matrix;
- the same RMS broken down per layer (the first integer in a module name) and per module type
  (the last component: q_proj, c_attn, …);
- principal angles between the adapters' column spaces (span B, where ΔW writes) and row
  spaces (span Aᵀ, what ΔW reads), from orthonormal bases: cosines = singular values of Q₁ᵀQ₂.
  Per module we report the overlap mean(cos²) ∈ [0, 1] (1: one space contains the other) and
  the largest cosine; two random subspaces of ranks k₁, k₂ in d dimensions overlap by about
  max(k₁, k₂)/d, reported as ``chance_overlap``.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from lorasum.adapters import read_adapter, unique_names
from lorasum.errors import LorasumError
from lorasum.factors import (
    Factors,
    global_cosine,
    module_cosines,
    orthonormal_basis,
    principal_cosines,
    rms,
    single_threaded,
)

HEATMAP_NAME = "similarity_heatmap.png"
PER_LAYER_NAME = "similarity_per_layer.png"
JSON_NAME = "similarity.json"


def pair_similarity(a: Factors, b: Factors) -> dict:
    """Cosine per shared module, their RMS, and the whole-adapter cosine."""
    shapes = [n for n in a.keys() & b.keys() if a[n].shape != b[n].shape]
    if shapes:
        n = sorted(shapes)[0]
        raise LorasumError(
            f"module {n} has ΔW {a[n].shape} in one adapter and {b[n].shape} in the other; "
            "compare adapters of the same base model"
        )
    cos = module_cosines(a, b)
    if not cos:
        raise LorasumError("the adapters share no module; compare adapters of one base model")
    return {
        "rms_cosine": rms(list(cos.values())),
        "global_cosine": global_cosine(a, b),
        "modules": cos,
        "unshared_modules": sorted(a.keys() ^ b.keys()),
    }


def similarity_matrix(adapters: Mapping[str, Factors]) -> list[dict]:
    """Every unordered pair of named adapters."""
    with single_threaded():  # small factored algebra (see factors.single_threaded)
        return [
            {"a": na, "b": nb, **pair_similarity(adapters[na], adapters[nb])}
            for na, nb in itertools.combinations(adapters, 2)
        ]


def combination_rms(pairs: Sequence[dict], names: Sequence[str]) -> float:
    """RMS cosine of a combination: a pair's own RMS; for more, the RMS over its pairs' RMS."""
    wanted = {frozenset(p) for p in itertools.combinations(names, 2)}
    values = [p["rms_cosine"] for p in pairs if frozenset((p["a"], p["b"])) in wanted]
    if len(values) != len(wanted):
        raise ValueError(f"missing pairs for {names}")
    return rms(values)


# --- breakdowns ------------------------------------------------------------------------------


def layer_index(module: str) -> int | None:
    """The layer a module belongs to: the first integer component of its name (None if none)."""
    return next((int(p) for p in module.split(".") if p.isdigit()), None)


def module_type(module: str) -> str:
    """The module's role: the last component of its name (q_proj, c_attn, down_proj, …)."""
    return module.rsplit(".", 1)[-1]


def breakdown(cosines: Mapping[str, float]) -> dict[str, dict[str, float]]:
    """RMS of per-module cosines grouped per layer and per module type."""
    per_layer: dict[int, list[float]] = defaultdict(list)
    per_type: dict[str, list[float]] = defaultdict(list)
    for name, c in cosines.items():
        layer = layer_index(name)
        if layer is not None:
            per_layer[layer].append(c)
        per_type[module_type(name)].append(c)
    return {
        "per_layer": {str(k): rms(v) for k, v in sorted(per_layer.items())},
        "per_module_type": {k: rms(v) for k, v in sorted(per_type.items())},
    }


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


Bases = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (basis of span B, of span Aᵀ)


def subspace_bases(a: Factors) -> Bases:
    """Orthonormal bases of every module's column space (span B) and row space (span Aᵀ)."""
    return {n: (orthonormal_basis(f.B), orthonormal_basis(f.A.T)) for n, f in a.items()}


def subspace_overlap(a: Factors | Bases, b: Factors | Bases) -> dict[str, dict]:
    """Principal angles between column spaces (span B) and row spaces (span Aᵀ) per module.

    Takes adapters or their `subspace_bases` (computed once per adapter for an N×N matrix).
    """
    bases_a = a if _is_bases(a) else subspace_bases(a)
    bases_b = b if _is_bases(b) else subspace_bases(b)
    result: dict[str, dict] = {}
    for side, space in enumerate(("column_space", "row_space")):
        modules, overlaps, largest, chance = {}, [], [], []
        for name in sorted(bases_a.keys() & bases_b.keys()):
            Q1, Q2 = bases_a[name][side], bases_b[name][side]  # (d, k1), (d, k2)
            cos = principal_cosines(Q1, Q2, orthonormal=True)  # (min(k1, k2),)
            modules[name] = [float(c) for c in cos]
            if cos.numel() == 0:
                continue  # a zero ΔW has no column/row space
            overlaps.append(float((cos**2).mean()))
            largest.append(float(cos.max()))
            chance.append(min(1.0, max(Q1.shape[1], Q2.shape[1]) / Q1.shape[0]))
        result[space] = {
            "mean_overlap": _mean(overlaps),
            "mean_max_cosine": _mean(largest),
            "chance_overlap": _mean(chance),
            "modules": modules,
        }
    return result


def _is_bases(x) -> bool:
    return all(isinstance(v, tuple) for v in x.values())


# --- adapters on disk ------------------------------------------------------------------------


def similarity(paths: Sequence[str | Path], plot: str | Path | None = None) -> dict:
    """`lorasum similarity`: the N×N cosines, breakdowns and principal angles of adapters.

    ``plot`` writes a heatmap, a per-layer line plot and the result as JSON into that directory.
    """
    from lorasum.adapters import check_compatible

    if len(paths) < 2:
        raise LorasumError("similarity needs at least two adapters")
    adapters = [read_adapter(p, strict=True) for p in paths]
    check_compatible(adapters, fan_in_fan_out=False)
    names = unique_names(adapters)
    factors = {n: a.modules for n, a in zip(names, adapters, strict=True)}
    pairs = similarity_matrix(factors)
    n = len(names)
    rms_m = [[1.0] * n for _ in range(n)]
    glob_m = [[1.0] * n for _ in range(n)]
    with single_threaded():
        bases = {n: subspace_bases(f) for n, f in factors.items()}
        for pair in pairs:
            pair.update(breakdown(pair["modules"]))
            pair.update(subspace_overlap(bases[pair["a"]], bases[pair["b"]]))
        for i, name in enumerate(names):  # an adapter with itself: 1, less for zero modules
            own = pair_similarity(factors[name], factors[name])
            rms_m[i][i], glob_m[i][i] = own["rms_cosine"], own["global_cosine"]
    for pair in pairs:
        i, j = names.index(pair["a"]), names.index(pair["b"])
        rms_m[i][j] = rms_m[j][i] = pair["rms_cosine"]
        glob_m[i][j] = glob_m[j][i] = pair["global_cosine"]
    result = {
        "adapters": [str(a.path) for a in adapters],
        "names": names,
        "matrix": {"rms_cosine": rms_m, "global_cosine": glob_m},
        "pairs": pairs,
    }
    if plot is not None:
        write_plots(result, Path(plot))
    return result


# --- output ----------------------------------------------------------------------------------


def format_similarity(result: dict) -> str:
    """A readable report: the N×N matrices, the pair table, per-type and per-layer RMS cosines."""
    names, pairs = result["names"], result["pairs"]
    labels = [f"[{i + 1}]" for i in range(len(names))]
    lines = [f"{lab} {name}" for lab, name in zip(labels, names, strict=True)]

    def matrix(title: str, m: list[list[float]]) -> None:
        lines.extend(["", title, "      " + "".join(f"{lab:>9}" for lab in labels)])
        for lab, row in zip(labels, m, strict=True):
            lines.append(f"{lab:<6}" + "".join(f"{v:>+9.4f}" for v in row))

    matrix("RMS cosine over modules", result["matrix"]["rms_cosine"])
    matrix("whole-adapter cosine", result["matrix"]["global_cosine"])
    label = {n: lab for n, lab in zip(names, labels, strict=True)}
    pair_names = [f"{label[p['a']]}·{label[p['b']]}" for p in pairs]
    lines += [
        "",
        f"{'pair':<9}{'RMS cos':>9}{'global':>9}{'modules':>9}"
        f"{'col overlap':>13}{'row overlap':>13}{'(chance col/row)':>19}",
    ]
    for pn, p in zip(pair_names, pairs, strict=True):
        col, row = p["column_space"], p["row_space"]
        lines.append(
            f"{pn:<9}{p['rms_cosine']:>9.4f}{p['global_cosine']:>+9.4f}{len(p['modules']):>9}"
            f"{col['mean_overlap']:>13.4f}{row['mean_overlap']:>13.4f}"
            f"{col['chance_overlap']:>11.4f}/{row['chance_overlap']:.4f}"
        )
    lines.append("(overlap: mean cos² of the principal angles between spans of B / of Aᵀ)")

    def grouped(title: str, key: str) -> None:
        groups = sorted({g for p in pairs for g in p[key]}, key=lambda g: (len(g), g))
        if not groups:
            return
        lines.extend(["", f"{title:<14}" + "".join(f"{pn:>9}" for pn in pair_names)])
        for g in groups:
            cells = [p[key].get(g) for p in pairs]
            lines.append(
                f"{g:<14}" + "".join("        -" if c is None else f"{c:>9.4f}" for c in cells)
            )

    grouped("RMS cos: type", "per_module_type")
    grouped("RMS cos: layer", "per_layer")
    return "\n".join(lines)


def write_plots(result: dict, out: Path) -> None:
    """Heatmap of the RMS cosine matrix and per-layer RMS cosine per pair (PNG), plus JSON.

    A directory this call created is removed again if writing fails (full disk, …)."""
    import shutil

    from lorasum.io import write_error

    out = Path(out)
    created = not out.exists()
    try:
        _write_plots(result, out)
    except BaseException as e:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        err = write_error(e, out)
        if err is e:
            raise
        raise err from None


def _write_plots(result: dict, out: Path) -> None:
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from lorasum.io import commit_temp, temp_beside, write_json

    if out.exists() and not out.is_dir():
        raise LorasumError(f"--plot {out} is a file; pass a directory")
    out.mkdir(parents=True, exist_ok=True)

    def save(fig, name: str) -> None:  # atomic: temp file + rename
        tmp = temp_beside(out / name, suffix=".png")
        try:
            fig.savefig(tmp, dpi=120)
            commit_temp(tmp, out / name)
        finally:
            plt.close(fig)
            if os.path.exists(tmp):
                os.unlink(tmp)

    names, m = result["names"], result["matrix"]["rms_cosine"]
    n = len(names)
    fig, ax = plt.subplots(figsize=(2.2 + 0.9 * n, 1.8 + 0.8 * n))
    vmax = max(1e-9, max(abs(v) for row in m for v in row if not math.isnan(v)))
    im = ax.imshow(m, cmap="viridis", vmin=0.0, vmax=vmax)
    ax.set_xticks(range(n), names, rotation=45, ha="right")
    ax.set_yticks(range(n), names)
    for i in range(n):
        for j in range(n):
            light = m[i][j] > 0.6 * vmax  # viridis is bright at the top: dark text there
            ax.text(
                j,
                i,
                f"{m[i][j]:.3f}",
                ha="center",
                va="center",
                fontsize=8,
                color="k" if light else "w",
            )
    fig.colorbar(im, ax=ax, label="RMS cosine of ΔW over modules")
    ax.set_title("Adapter similarity (RMS cosine)")
    fig.tight_layout()
    save(fig, HEATMAP_NAME)

    fig, ax = plt.subplots(figsize=(7, 4))
    for p in result["pairs"]:
        layers = sorted(p["per_layer"], key=int)
        ax.plot(
            [int(k) for k in layers],
            [p["per_layer"][k] for k in layers],
            marker="o",
            label=f"{p['a']} · {p['b']}",
        )
    ax.set_xlabel("layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("RMS cosine of ΔW over the layer's modules")
    ax.set_title("Adapter similarity per layer")
    if result["pairs"]:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save(fig, PER_LAYER_NAME)
    write_json(out / JSON_NAME, result)
