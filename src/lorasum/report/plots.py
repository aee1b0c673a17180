"""The study's figures, as PNG bytes (matplotlib, Agg backend).

Every function takes a study's results (`lorasum.results_schema.Results`, or the parsed
results.json dict) or a piece of them, and returns the PNG of one small figure (a few tens of KB), or None when the results hold nothing to draw.
Figures are closed after use. Colours: one per combination, the same in every figure.
"""

from __future__ import annotations

import io
import math

from lorasum.analysis.predictors import predictor_labels
from lorasum.data.sources import combo_name
from lorasum.results_schema import Combination, Results, SeedRow, Snapshots, as_results

# axis labels of the registered predictors (`lorasum.analysis.predictors`); others: their name
PREDICTOR_LABELS = predictor_labels()


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig, dpi: int = 100) -> bytes:
    """The figure as a PNG of at most 256 colours (a third of the bytes, the same to the eye),
    and closed."""
    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", pad_inches=0.08)
    _plt().close(fig)
    buf.seek(0)
    with Image.open(buf) as im:
        small = im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    out = io.BytesIO()
    small.save(out, format="PNG", optimize=True)
    return out.getvalue()


def combo_colors(results: Results | dict) -> dict[str, tuple]:
    """One colour per combination (tab10, tab20 beyond ten), in the order of the results."""
    plt = _plt()
    names = [combo_name(c.domains) for c in as_results(results).combinations]
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    return {n: cmap(i % cmap.N) for i, n in enumerate(names)}


def is_number(v) -> bool:
    """A finite int or float (JSON null, NaN and strings are not)."""
    return isinstance(v, int | float) and math.isfinite(v)


def predictor_value(row: Combination | SeedRow, name: str) -> float | None:
    """A predictor of a combination (or of one seed's row): ``row.predictors[name]``, with
    ``rms_cosine`` also read from the row itself (older results have no ``predictors``)."""
    v = (row.predictors or {}).get(name)
    if v is None and name == "rms_cosine":
        v = row.rms_cosine
    return v if is_number(v) else None


def _legend(ax, n: int) -> None:
    if not ax.get_legend_handles_labels()[0]:
        return
    if 6 < n <= MANY:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=6.5, frameon=False)
    else:
        ax.legend(loc="best", fontsize=7)


MANY = 12  # beyond this many combinations, figures stop naming each one in a legend


def _plot_combination(
    ax, r: Combination, name: str, color: str, label: str | None, many: bool, several: bool
) -> list[float]:
    """One combination's mean (with its CI bar if any) and, over several seeds, its seed
    points; returns the x values drawn."""
    x, y = predictor_value(r, name), r.delta_pct
    xs = [x]
    if several:
        seed_pts = [(predictor_value(s, name), s.delta_pct) for s in r.per_seed or []]
        seed_pts = [(a, b) for a, b in seed_pts if a is not None and is_number(b)]
        if seed_pts:
            xs += [a for a, _ in seed_pts]
            ax.scatter(*zip(*seed_pts, strict=True), color=color, alpha=0.3, s=10)
    ci = (r.ci95 or {}).get("delta_pct")
    if ci and is_number(ci[0]) and is_number(ci[1]):
        ax.errorbar(
            [x],
            [y],
            yerr=[[y - ci[0]], [ci[1] - y]],
            fmt="o",
            color=color,
            capsize=3,
            label=label,
            zorder=3,
            ms=5 if many else 6,
        )
    else:
        ax.scatter([x], [y], color=color, s=30, label=label, zorder=3)
    return xs


def _name_extremes(ax, rows: list[Combination], name: str) -> None:
    """Name the three highest and three lowest Δ% beside their points."""
    ranked = sorted(rows, key=lambda r: r.delta_pct)
    for r in ranked[:3] + ranked[-3:]:
        ax.annotate(
            combo_name(r.domains),
            (predictor_value(r, name), r.delta_pct),
            xytext=(4, 3),
            textcoords="offset points",
            fontsize=6.5,
        )


def _plot_fit(ax, results: Results, name: str, points: dict, xs_all: list[float]) -> None:
    """The least-squares line with its confidence band, or the bare line from the fit (or
    ``results.correlation`` for RMS cosine in older results) over the drawn x range."""
    band = points.get("band") or {}
    fit = points.get("fit") or {}
    line = fit if fit.get("slope") is not None else None
    if line is None and name == "rms_cosine":
        corr = results.correlation
        line = (
            {"slope": corr.slope, "intercept": corr.intercept} if corr.slope is not None else None
        )
    ys_band = band.get("y") or []
    if ys_band and all(v is not None for v in ys_band):
        bx = band["x"]
        lower, upper = band.get("lower") or [], band.get("upper") or []
        if lower and all(v is not None for v in lower + upper):
            ax.fill_between(
                bx,
                lower,
                upper,
                color="black",
                alpha=0.12,
                lw=0,
                label=f"{band.get('confidence', 0.95):.0%} band of the line",
            )
        ax.plot(bx, ys_band, color="black", lw=1, label="least squares")
    elif line is not None:
        lo, hi = min(xs_all), max(xs_all)
        ax.plot(
            [lo, hi],
            [line["slope"] * lo + line["intercept"], line["slope"] * hi + line["intercept"]],
            color="black",
            lw=1,
            label="least squares",
        )


def delta_vs_predictor(results: Results | dict, name: str) -> bytes | None:
    """Δ% against one predictor: every (combination, seed) point, each combination's mean, and
    the least-squares line with its 95 % confidence band (``results.statistics[name]``, or
    ``results.correlation`` for RMS cosine in older results: line only).

    Up to ``MANY`` combinations each has its colour and legend entry; beyond, one colour, and
    the three highest and three lowest Δ% are named beside their points."""
    plt = _plt()
    results = as_results(results)
    rows = [
        r
        for r in results.combinations
        if predictor_value(r, name) is not None and is_number(r.delta_pct)
    ]
    if not rows:
        return None
    many = len(rows) > MANY
    colors = combo_colors(results)
    stats = (results.statistics or {}).get(name) or {}
    points = stats.get("points") or {}
    several = len(results.seeds or []) > 1
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    xs_all = []
    for r in rows:
        cname = combo_name(r.domains)
        color = "#4c72b0" if many else colors[cname]
        label = None if many else cname
        xs_all += _plot_combination(ax, r, name, color, label, many, several)
    if many:
        _name_extremes(ax, rows, name)
    _plot_fit(ax, results, name, points, xs_all)
    ax.axhline(0, color="grey", lw=0.8, ls="--")
    ax.margins(x=0.12, y=0.15)
    ax.set_xlabel(PREDICTOR_LABELS.get(name, name))
    ax.set_ylabel("Δ% ppl, naive sum vs merged-data")
    ax.grid(alpha=0.3)
    _legend(ax, len(rows))
    fig.tight_layout()
    return _png(fig)


def _pair_matrix(results: Results) -> tuple[list[str], list[list[float | None]]]:
    """Domains and the symmetric matrix of RMS cosine between their adapters (mean over seeds);
    None where a pair was not measured, 1 on the diagonal."""
    names = list(results.domains)
    sums: dict[tuple[str, str], list[float]] = {}
    for p in results.pairs:
        if is_number(p.rms_cosine):
            sums.setdefault((p.a, p.b), []).append(p.rms_cosine)
            sums.setdefault((p.b, p.a), []).append(p.rms_cosine)
    m = [
        [1.0 if a == b else (sum(v) / len(v) if (v := sums.get((a, b))) else None) for b in names]
        for a in names
    ]
    return names, m


def _heatmap(ax, matrix, row_labels, col_labels, values, fmt: str, cmap: str, vmin, vmax):
    import numpy as np

    data = np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=float)
    im = ax.imshow(data, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(col_labels)), col_labels, rotation=30, ha="right", fontsize=9)
    ax.set_yticks(range(len(row_labels)), row_labels, fontsize=9)
    small = len(row_labels) * len(col_labels) <= 120
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            if v is None or not small:
                continue
            shade = data[i, j]
            dark = not np.isnan(shade) and (shade - vmin) / ((vmax - vmin) or 1) > 0.6
            ax.text(
                j,
                i,
                format(v, fmt),
                ha="center",
                va="center",
                fontsize=9,
                color="white" if dark else "black",
            )
    return im


def cosine_heatmap(results: Results | dict) -> bytes | None:
    """Domains × domains RMS cosine of their adapters' ΔW (mean over seeds)."""
    plt = _plt()
    names, m = _pair_matrix(as_results(results))
    off = [v for i, row in enumerate(m) for j, v in enumerate(row) if i != j and v is not None]
    if not off:
        return None
    side = max(3.6, 0.55 * len(names) + 2.0)
    fig, ax = plt.subplots(figsize=(side + 0.8, side))
    shown = [[None if i == j else v for j, v in enumerate(row)] for i, row in enumerate(m)]
    im = _heatmap(ax, shown, names, names, shown, ".3f", "viridis", 0.0, max(off))
    fig.colorbar(im, ax=ax, shrink=0.8, label="RMS cosine")
    ax.set_title("RMS cosine between domain adapters", fontsize=9)
    fig.tight_layout()
    return _png(fig)


def cross_domain_heatmap(cross: dict) -> bytes | None:
    """Adapters × test domains perplexity; colour = ppl relative to the base model's on that
    domain (log scale, so 0.5× and 2× are equally far from 1×), numbers = ppl."""
    import numpy as np

    plt = _plt()
    adapters, domains = cross.get("adapters") or [], cross.get("domains") or []
    ppl = cross.get("perplexity") or {}
    if not adapters or not domains:
        return None
    base = ppl.get("base") or {}
    values = [[(ppl.get(a) or {}).get(d) for d in domains] for a in adapters]
    ratio = [
        [
            math.log2(v / base[d])
            if is_number(v) and is_number(base.get(d)) and base[d] > 0
            else None
            for v, d in zip(row, domains, strict=True)
        ]
        for row in values
    ]
    finite = [abs(v) for row in ratio for v in row if v is not None]
    lim = max(finite) if finite and max(finite) > 0 else 1.0
    fig, ax = plt.subplots(
        figsize=(max(4.5, 0.9 * len(domains) + 3.0), max(3.0, 0.32 * len(adapters) + 1.4))
    )
    im = _heatmap(
        ax,
        ratio,
        adapters,
        domains,
        [[None] * len(domains)] * len(adapters),
        ".1f",
        "RdYlGn_r",
        -lim,
        lim,
    )
    data = np.array([[np.nan if v is None else v for v in row] for row in ratio])
    if len(adapters) * len(domains) <= 200:
        for i, row in enumerate(values):
            for j, v in enumerate(row):
                if is_number(v):
                    dark = not np.isnan(data[i, j]) and abs(data[i, j]) > 0.6 * lim
                    ax.text(
                        j,
                        i,
                        f"{v:.1f}",
                        ha="center",
                        va="center",
                        fontsize=8,
                        color="white" if dark else "black",
                    )
    cb = fig.colorbar(im, ax=ax, shrink=0.8)
    cb.set_label("log₂(ppl / base ppl)", fontsize=8)
    ax.set_xlabel("test domain", fontsize=8)
    ax.set_title("Perplexity of each adapter on each domain's test split", fontsize=9)
    fig.tight_layout()
    return _png(fig)


def _loss_by_unit(curves: dict[str, list]) -> dict[str, dict[str, list]]:
    """``{"seed-<s>/<unit>": points}`` as ``{unit: {seed: points}}``, without empty curves."""
    units: dict[str, dict[str, list]] = {}
    for key, pts in curves.items():
        seed, _, unit = key.partition("/")
        if pts:
            units.setdefault(unit or seed, {})[seed if unit else ""] = pts
    return units


def train_curves(curves: dict[str, list]) -> bytes | None:
    """Training loss per optimizer step of every adapter: single-domain adapters in one panel,
    merged-data adapters in another (same loss scale side by side), one colour per adapter and
    one line per seed; adapters are named in a legend up to ten per panel.

    ``curves`` maps ``"seed-<s>/<unit>"`` to ``[[step, loss], ...]``."""
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    units = _loss_by_unit(curves)
    if not units:
        return None
    order = sorted(units, key=lambda u: (u.startswith("merged-"), u.count("+"), u))
    groups = [
        ("single-domain adapters", [u for u in order if not u.startswith("merged-")]),
        ("merged-data adapters", [u for u in order if u.startswith("merged-")]),
    ]
    groups = [(t, us) for t, us in groups if us]
    fig, axes = plt.subplots(
        1, len(groups), figsize=(5.0 * len(groups), 3.3), squeeze=False, sharey=True
    )
    for ax, (title, us) in zip(axes.flat, groups, strict=True):
        named = len(us) <= 10
        cmap = plt.get_cmap("tab10" if named else "viridis")
        for k, unit in enumerate(us):
            color = cmap(k) if named else cmap(k / max(1, len(us) - 1))
            for j, (_, pts) in enumerate(sorted(units[unit].items())):
                ax.plot(
                    [p[0] for p in pts],
                    [p[1] for p in pts],
                    lw=0.9 if named else 0.6,
                    color=color,
                    label=unit.removeprefix("merged-") if j == 0 and named else None,
                )
        ax.set_title(f"{title} ({len(us)})", fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("optimizer step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if named:
            ax.legend(fontsize=6.5, ncol=2 if len(us) > 5 else 1)
    axes.flat[0].set_ylabel("training loss", fontsize=8)
    fig.tight_layout()
    return _png(fig)


KINDS = [
    ("ppl_base", "base", "#bbbbbb"),
    ("ppl_single", "single adapter", "#4c72b0"),
    ("ppl_merged", "merged-data", "#55a868"),
    ("ppl_sum", "naive sum", "#c44e52"),
]


def per_domain_bars(results: Results | dict) -> bytes | None:
    """Per combination, per member domain: perplexity of base, single adapter, merged-data
    adapter and naive sum (means over seeds)."""
    import numpy as np

    plt = _plt()
    results = as_results(results)
    rows = [r for r in results.combinations if r.per_domain]
    if not rows:
        return None
    if len(rows) > 9:
        return _per_domain_by_domain(results, rows)
    cols = min(3, len(rows))
    nrows = math.ceil(len(rows) / cols)
    fig, axes = plt.subplots(
        nrows, cols, figsize=(3.4 * cols + 0.3, 2.5 * nrows + 0.6), squeeze=False
    )
    width = 0.2
    for ax, r in zip(axes.flat, rows, strict=False):
        doms = list(r.per_domain)
        x = np.arange(len(doms))
        for k, (key, label, color) in enumerate(KINDS):
            vals = [getattr(r.per_domain[d], key) for d in doms]
            vals = [v if is_number(v) else np.nan for v in vals]
            ax.bar(x + (k - 1.5) * width, vals, width, color=color, label=label)
        ax.set_xticks(x, doms, fontsize=7)
        ax.set_title(" + ".join(r.domains), fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(rows) :]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=4, fontsize=7, frameon=False)
    fig.supylabel("test perplexity", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    return _png(fig)


def _per_domain_by_domain(results: Results, rows: list[Combination]) -> bytes:
    """Many combinations: one panel per domain, one group of bars (merged-data, naive sum) per
    combination holding it, named by the other domains; base and single adapter as lines."""
    import numpy as np

    plt = _plt()
    names = list(results.domains)
    cols = min(3, len(names))
    nrows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(
        nrows, cols, figsize=(3.6 * cols + 0.3, 2.4 * nrows + 0.6), squeeze=False
    )
    width = 0.4
    for ax, d in zip(axes.flat, names, strict=False):
        mine = [r.per_domain[d] for r in rows if d in r.per_domain]
        others = ["+".join(o for o in r.domains if o != d) for r in rows if d in r.per_domain]
        x = np.arange(len(mine))
        for k, (key, label, color) in enumerate(KINDS[2:]):
            vals = [getattr(v, key) for v in mine]
            ax.bar(
                x + (k - 0.5) * width,
                [v if is_number(v) else np.nan for v in vals],
                width,
                color=color,
                label=label,
            )
        for key, label, color in KINDS[:2]:
            vals = [getattr(v, key) for v in mine if is_number(getattr(v, key))]
            if vals:
                ax.axhline(sum(vals) / len(vals), color=color, lw=1.2, ls="--", label=label)
        ax.set_xticks(x, others, rotation=60, ha="right", fontsize=6)
        ax.set_title(f"{d} test split, with …", fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(names) :]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=4, fontsize=7, frameon=False)
    fig.supylabel("test perplexity", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return _png(fig)


def predicted_vs_measured(prediction: dict, colors: dict | None = None) -> bytes | None:
    """Leave-one-combination-out predicted Δ% against measured Δ%, one panel per predictor,
    with the identity line; ``colors`` (combination → colour, e.g. ``combo_colors``) keeps
    each combination's colour and order from the other figures."""
    plt = _plt()
    names = [n for n, p in prediction.items() if (p or {}).get("points")]
    if not names:
        return None
    cols = min(len(names), 4)  # at most 4 panels a row: a study records up to 14 predictors
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols + 0.4, 3.4 * rows), squeeze=False)
    for ax in axes.flat[len(names) :]:
        ax.set_visible(False)
    present = {pt["combination"] for n in names for pt in prediction[n]["points"]}
    combos = [c for c in colors or {} if c in present] + sorted(present - set(colors or {}))
    cmap = plt.get_cmap("tab10" if len(combos) <= 10 else "tab20")
    many = len(combos) > MANY
    color = {
        c: "#4c72b0" if many else (colors or {}).get(c, cmap(i % cmap.N))
        for i, c in enumerate(combos)
    }
    for ax, name in zip(axes.flat, names, strict=False):
        pts = [
            p
            for p in prediction[name]["points"]
            if is_number(p.get("predicted")) and is_number(p.get("measured"))
        ]
        for c in combos:
            mine = [p for p in pts if p["combination"] == c]
            if mine:
                ax.scatter(
                    [p["measured"] for p in mine],
                    [p["predicted"] for p in mine],
                    s=16,
                    color=color[c],
                    label=None if many else c,
                )
        vals = [p["measured"] for p in pts] + [p["predicted"] for p in pts]
        if vals:
            lo, hi = min(vals), max(vals)
            pad = 0.05 * ((hi - lo) or 1.0)
            ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="grey", lw=0.8, ls="--")
        r, rho = prediction[name].get("pearson_r"), prediction[name].get("spearman_rho")
        stat = ", ".join(f"{s} = {v:.2f}" for s, v in (("r", r), ("ρ", rho)) if is_number(v))
        ax.set_title(f"{name}" + (f"\n{stat}" if stat else ""), fontsize=8)
        ax.set_xlabel("measured Δ%", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for row in axes:
        row[0].set_ylabel("predicted Δ% (leave one combination out)", fontsize=8)
    _legend(axes.flat[len(names) - 1], 7)  # outside, right of the last panel (none when many)
    fig.tight_layout()
    return _png(fig)


def delta_vs_length(snapshots: Snapshots | None, top_methods: int = 3) -> bytes | None:
    """Δ% against training length along the runs (``results.snapshots``): left, singles and
    merged adapter after equal epochs; right, after equal optimizer steps per adapter. The sum
    of every combination as a thin line, its mean over combinations bold, and the mean of the
    ``top_methods`` data-free methods with the lowest mean Δ% dashed."""
    rows = (snapshots.combinations if snapshots else None) or []
    if not rows:
        return None
    plt = _plt()
    from matplotlib.ticker import ScalarFormatter

    panels = [
        ("equal_epochs", "epochs", "equal epochs (passes over each adapter's own rows)"),
        ("equal_steps", "steps", "equal optimizer steps per adapter"),
    ]
    fig, axes = plt.subplots(1, 2, figsize=(10.0, 3.6), squeeze=False)
    cmap = plt.get_cmap("tab10" if len(rows) <= 10 else "tab20")
    methods = [m for m in snapshots.methods or [] if m != "sum"]
    for ax, (key, x, title) in zip(axes.flat, panels, strict=True):
        by_method: dict[str, dict[float, list[float]]] = {}
        for i, row in enumerate(rows):
            pts = sorted(getattr(row, key) or [], key=lambda p: p[x])
            xs = [p[x] for p in pts if is_number((p["delta_pct"].get("sum") or {}).get("mean"))]
            ys = [p["delta_pct"]["sum"]["mean"] for p in pts if p[x] in xs]
            if xs:
                ax.plot(
                    xs,
                    ys,
                    lw=0.8,
                    alpha=0.6,
                    marker="o",
                    ms=2.5,
                    color=cmap(i % cmap.N),
                    label=row.combination if len(rows) <= 10 else None,
                )
            for p in pts:
                for m, d in p["delta_pct"].items():
                    if is_number(d.get("mean")):
                        by_method.setdefault(m, {}).setdefault(p[x], []).append(d["mean"])
        means = {m: {k: sum(v) / len(v) for k, v in pts.items()} for m, pts in by_method.items()}
        best = sorted(
            (m for m in methods if m in means),
            key=lambda m: sum(means[m].values()) / len(means[m]),
        )[:top_methods]
        for m, style in [("sum", "-")] + [(m, "--") for m in best]:
            if m in means:
                xs = sorted(means[m])
                ax.plot(
                    xs,
                    [means[m][k] for k in xs],
                    style,
                    lw=2.0 if m == "sum" else 1.4,
                    color="black" if m == "sum" else None,
                    label=f"{m} (mean)",
                )
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.set_xlabel("epochs" if x == "epochs" else "optimizer steps per adapter", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    axes.flat[0].set_ylabel("Δ% vs merged-data training (< 0: the sum wins)", fontsize=8)
    fig.tight_layout()
    return _png(fig)
