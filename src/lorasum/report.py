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


def render_markdown(results: dict) -> str:
    cfg = results["train_config"]
    names = list(results["domains"])
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
        f"max length {cfg['max_length']}, seed {cfg['seed']}, split seed {cfg['split_seed']}; "
        f"loss and perplexity on {'answer tokens only' if cfg['answer_only'] else 'all tokens'}.",
        "",
        (
            "LoRA init: each domain adapter has its own seed (`--seed-per-domain`)."
            if results.get("seed_per_domain")
            else "LoRA init: every adapter starts from the same seeded init (as with the paper's "
            "HF Trainer scripts), so the domain adapters share their initial A; "
            "`--seed-per-domain` gives each its own."
        ),
        "",
        "## Composition vs merged-data training",
        "",
        "| combination | RMS cosine | ppl base | ppl merged-data | ppl naive sum | Δ% (sum vs merged) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results["combinations"]:
        lines.append(
            f"| {' + '.join(r['domains'])} | {_f(r['rms_cosine'], 4)} | {_f(r['ppl_base'])} | "
            f"{_f(r['ppl_merged'])} | {_f(r['ppl_sum'])} | {_f(r['delta_pct'], 2, True)} |"
        )
    c = results["correlation"]
    lines += [
        "",
        f"Δ% against RMS cosine over {c['n']} combinations: Pearson r = {_f(c['pearson_r'], 3)}"
        f" (p = {_f(c['p_value'], 3)}), least-squares Δ% = {_f(c['slope'], 1)} · cos "
        f"{_f(c['intercept'], 2, True)}. See `cosine_vs_delta.png`.",
        "",
        "## Per domain",
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
        "## Orthogonality of the domain adapters",
        "",
        "| pair | RMS cosine over modules | whole-adapter cosine | max abs module cosine |",
        "|---|---:|---:|---:|",
    ]
    for p in results["pairs"]:
        mx = max((abs(v) for v in p["modules"].values()), default=None)
        lines.append(
            f"| {p['a']} · {p['b']} | {_f(p['rms_cosine'], 4)} | "
            f"{_f(p['global_cosine'], 4, True)} | {_f(mx, 4)} |"
        )
    lines += [
        "",
        "## Data and training",
        "",
        "| domain | train rows | test rows | test split hash | adapter steps | first → last loss | train tok/s |",
        "|---|---:|---:|---|---:|---|---:|",
    ]
    for n in names:
        fp, m = results["data"][n], results["singles"][n]["train"]
        lines.append(
            f"| {n} | {fp['train']['n']} | {fp['test']['n']} | `{fp['test']['sha256']}` | "
            f"{m['steps']} | {_f(m['first_loss'])} → {_f(m['final_loss'])} | "
            f"{_f(m.get('tokens_per_second'), 0)} |"
        )
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
        "- With a handful of combinations, r is descriptive, not significant; one seed, no",
        "  confidence intervals.",
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
    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    ax.scatter(xs, ys, color="tab:blue", zorder=3)
    # Alternate label sides so near-coincident points stay readable.
    order = sorted(range(len(rows)), key=lambda i: (xs[i], ys[i]))
    for k, i in enumerate(order):
        left = k % 2 == 0
        ax.annotate(
            " + ".join(rows[i]["domains"]),
            (xs[i], ys[i]),
            textcoords="offset points",
            xytext=(-6, -12) if left else (6, 6),
            ha="right" if left else "left",
            fontsize=8,
        )
    ax.margins(x=0.25, y=0.15)
    c = results["correlation"]
    if c["slope"] is not None:
        lo, hi = min(xs), max(xs)
        ax.plot(
            [lo, hi],
            [c["slope"] * lo + c["intercept"], c["slope"] * hi + c["intercept"]],
            color="tab:orange",
            label=f"least squares (r = {_f(c['pearson_r'], 2)})",
        )
        ax.legend(loc="best", fontsize=8)
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
