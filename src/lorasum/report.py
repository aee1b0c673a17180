"""The study's report: report.md (tables + how to read them) and cosine_vs_delta.png."""

from __future__ import annotations

from pathlib import Path

from lorasum.io import atomic_write_text


def _f(x, digits: int = 2, signed: bool = False) -> str:
    if x is None:
        return "n/a"
    try:
        return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"
    except (TypeError, ValueError):
        return str(x)


def _ci(r: dict, key: str, digits: int = 2, signed: bool = False) -> str:
    """`mean [lo, hi]` when a 95% interval exists (several seeds), else the value."""
    ci = (r.get("ci95") or {}).get(key)
    value = _f(r[key], digits, signed)
    return f"{value} [{_f(ci[0], digits, signed)}, {_f(ci[1], digits, signed)}]" if ci else value


def _tokens(metrics: dict) -> str:
    """`all / in loss` training tokens of one adapter (older runs did not record them)."""
    if metrics.get("real_tokens") is None:
        return "n/a"
    return f"{metrics['real_tokens']:,} / {metrics['answer_tokens']:,}"


def _pair_means(pairs: list[dict]) -> list[dict]:
    """Pairs averaged over seeds (one row per pair, in first-seen order)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for p in pairs:
        groups.setdefault((p["a"], p["b"]), []).append(p)
    out = []
    for (a, b), ps in groups.items():
        out.append(
            {
                "a": a,
                "b": b,
                "rms_cosine": sum(p["rms_cosine"] for p in ps) / len(ps),
                "global_cosine": sum(p["global_cosine"] for p in ps) / len(ps),
                "max_abs": max(abs(v) for p in ps for v in p["modules"].values()),
            }
        )
    return out


def render_markdown(results: dict) -> str:
    cfg = results["train_config"]
    names = list(results["domains"])
    seeds = results.get("seeds", [])
    several = len(seeds) > 1
    lines = [
        "# lorasum study: naive LoRA summation vs merged-data training",
        "",
        f"Model `{results['model']}`, preset `{results['preset']}`, domains "
        + ", ".join(f"`{n}` ({s})" for n, s in results["domains"].items())
        + f". Wall time of this run: {results['wall_seconds']:.0f} s.",
        "",
        f"LoRA r={cfg['rank']}, alpha={cfg['alpha']:g}, dropout={cfg['dropout']:g}, "
        f"targets `{cfg['target_modules']}`; lr {cfg['lr']:g}, batch {cfg['batch_size']}, "
        f"epochs {cfg['epochs']:g}{', max steps ' + str(cfg['max_steps']) if cfg['max_steps'] else ''}, "
        f"max length {cfg['max_length']}, split seed {cfg['split_seed']}, "
        f"training seed{'s' if several else ''} {', '.join(map(str, seeds))}; "
        f"loss and perplexity on {'answer tokens only' if cfg['answer_only'] else 'all tokens'}.",
        "",
        (
            "LoRA init: each domain adapter has its own seed (`--seed-per-domain`)."
            if results.get("seed_per_domain")
            else "LoRA init: within a seed every adapter starts from the same init (as with the "
            "paper's HF Trainer scripts), so the domain adapters share their initial A; "
            "`--seed-per-domain` gives each its own."
        ),
        "",
        "## Composition vs merged-data training",
        "",
        (
            f"Means over {len(seeds)} seeds, [95% t-interval of the mean]."
            if several
            else "One seed: no confidence intervals (`--seeds 1,2,3` adds them)."
        ),
        "",
        "| combination | RMS cosine | ppl base | ppl merged-data | ppl naive sum | Δ% (sum vs merged) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results["combinations"]:
        lines.append(
            f"| {' + '.join(r['domains'])} | {_ci(r, 'rms_cosine', 4)} | {_f(r['ppl_base'])} | "
            f"{_ci(r, 'ppl_merged')} | {_ci(r, 'ppl_sum')} | {_ci(r, 'delta_pct', 2, True)} |"
        )
    c = results["correlation"]
    lines += [
        "",
        f"Δ% against RMS cosine over {c['n']} points ({len(results['combinations'])} combinations"
        f" × {len(seeds) or 1} seed{'s' if several else ''}): Pearson r = {_f(c['pearson_r'], 3)}"
        f" (p = {_f(c['p_value'], 3)}), least-squares Δ% = {_f(c['slope'], 1)} · cos "
        f"{_f(c['intercept'], 2, True)}. See `cosine_vs_delta.png`.",
        "",
        "## Per domain" + (" (means over seeds)" if several else ""),
        "",
        "| combination | domain | ppl base | ppl single adapter | ppl merged-data | ppl naive sum | Δ% |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results["combinations"]:
        for d, v in r["per_domain"].items():
            lines.append(
                f"| {' + '.join(r['domains'])} | {d} | {_f(v['ppl_base'])} | {_f(v['ppl_single'])} | "
                f"{_f(v['ppl_merged'])} | {_f(v['ppl_sum'])} | {_f(v['delta_pct'], 2, True)} |"
            )
    lines += [
        "",
        "## Orthogonality of the domain adapters" + (" (means over seeds)" if several else ""),
        "",
        "| pair | RMS cosine over modules | whole-adapter cosine | max abs module cosine |",
        "|---|---:|---:|---:|",
    ]
    for p in _pair_means(results["pairs"]):
        lines.append(
            f"| {p['a']} · {p['b']} | {_f(p['rms_cosine'], 4)} | "
            f"{_f(p['global_cosine'], 4, True)} | {_f(p['max_abs'], 4)} |"
        )
    lines += [
        "",
        "## Data and training",
        "",
        "| domain | train rows | test rows | test split hash | adapter steps | train tokens (all / in loss) | test tokens in ppl | first → last loss | train tok/s |",
        "|---|---:|---:|---|---:|---:|---:|---|---:|",
    ]
    for n in names:
        fp, ms = results["data"][n], results["singles"][n]["train"]
        mean = lambda k, ms=ms: sum(m[k] or 0.0 for m in ms) / len(ms)  # noqa: E731
        lines.append(
            f"| {n} | {fp['train']['n']} | {fp['test']['n']} | `{fp['test']['sha256']}` | "
            f"{ms[0]['steps']} | {_tokens(ms[0])} | {results['singles'][n].get('tokens', 'n/a')} | "
            f"{_f(mean('first_loss'))} → {_f(mean('final_loss'))} | "
            f"{_f(mean('tokens_per_second'), 0)} |"
        )
    merged = results.get("merged_training") or {}
    if merged:
        lines += [
            "",
            "Merged-data adapters (one epoch over the union of their domains' training rows): "
            + "; ".join(
                f"{u.removeprefix('merged-')} {ms[0]['steps']} steps, {_tokens(ms[0])} tokens"
                for u, ms in merged.items()
            )
            + ".",
        ]
    lines += [
        "",
        "## How to read these numbers",
        "",
        "- **ppl** is perplexity = exp(total negative log-likelihood / number of counted tokens) on",
        "  the test split, counting answer tokens (and the closing EOS) only, never padding; for a",
        "  combination the test set is the union of its domains' test splits, token-weighted.",
        "- **merged-data** is one LoRA trained on the concatenated training data of the combination,",
        "  with the same hyper-parameters as the single-domain adapters.",
        "- **naive sum** adds the domain adapters' weight deltas, ΔW = Σ s·B·A, exactly (no",
        "  training, no SVD).",
        "- **Δ%** = (ppl_sum − ppl_merged) / ppl_merged × 100: negative means the sum beats",
        "  merged-data training, positive means the adapters interfere.",
        "- **RMS cosine** is the root-mean-square over adapted modules of the cosine similarity",
        "  between two adapters' ΔW (0 = orthogonal); for three or more domains, the RMS over the",
        "  pairs. The paper predicts Δ% to grow roughly linearly with it.",
        "- With a handful of points, r is descriptive; its p-value assumes independent points,",
        "  which seeds of one combination are not.",
        "",
    ]
    return "\n".join(lines)


def plot_cosine_vs_delta(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["combinations"]
    xs = [r["rms_cosine"] for r in rows]
    ys = [r["delta_pct"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    several = len(results.get("seeds", [])) > 1
    colors = plt.get_cmap("tab10")
    # One colour per combination, named in the legend: unambiguous however close the points are.
    for i, r in enumerate(rows):
        color = colors(i % 10)
        label = " + ".join(r["domains"])
        if several:
            ax.scatter(
                [p["rms_cosine"] for p in r["per_seed"]],
                [p["delta_pct"] for p in r["per_seed"]],
                color=color,
                alpha=0.35,
                s=14,
            )
            lo, hi = r["ci95"]["delta_pct"]
            ax.errorbar(
                [xs[i]],
                [ys[i]],
                yerr=[[ys[i] - lo], [hi - ys[i]]],
                fmt="o",
                color=color,
                capsize=3,
                label=f"{label} (mean, 95% CI)",
                zorder=3,
            )
        else:
            ax.scatter([xs[i]], [ys[i]], color=color, s=36, label=label, zorder=3)
    ax.margins(x=0.15, y=0.15)
    c = results["correlation"]
    if c["slope"] is not None:
        fit_x = [p["rms_cosine"] for r in rows for p in r.get("per_seed", [])] or xs
        lo, hi = min(fit_x), max(fit_x)
        ax.plot(
            [lo, hi],
            [c["slope"] * lo + c["intercept"], c["slope"] * hi + c["intercept"]],
            color="black",
            lw=1,
            label=f"least squares (r = {_f(c['pearson_r'], 2)})",
        )
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize=7)
    ax.axhline(0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("RMS cosine similarity of the adapters' ΔW")
    ax.set_ylabel("Δ% perplexity, naive sum vs merged-data")
    ax.set_title(f"{results['model']} · preset {results['preset']}", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def write_report(results: dict, out: Path) -> None:
    atomic_write_text(out / "report.md", render_markdown(results))
    plot_cosine_vs_delta(results, out / "cosine_vs_delta.png")
