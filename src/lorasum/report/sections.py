"""The report's sections, built from a study's results (`lorasum.results_schema.Results`).

Each ``_<section>(results)`` returns a list of blocks; a section whose fields the results lack
(older studies) returns a one-line ``Note`` instead. ``build_report`` lists them in order. Each
also takes the parsed results.json dict (read through the schema, older versions migrated).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from lorasum.report import plots
from lorasum.report.accuracy import accuracy_blocks
from lorasum.report.blocks import (
    Bullets,
    Code,
    Figure,
    Note,
    Para,
    Section,
    Table,
    combo_label,
    fmt,
    fmt_ci,
    fmt_delta,
    fmt_g,
    fmt_interval,
    fmt_tokens,
    pair_means,
)
from lorasum.report.findings import best_method_of, paper_vs_run, what_this_means
from lorasum.results_schema import Results, as_results


def _settings(results: Results | dict) -> list:
    results = as_results(results)
    cfg = results.train_config
    seeds = results.seeds or []
    several = len(seeds) > 1
    blocks = [
        Para(
            f"Model `{results.model}`, preset `{results.preset}`, domains "
            + ", ".join(f"`{n}` ({s})" for n, s in results.domains.items())
            + f". Wall time of this run: {fmt(results.wall_seconds, 0)} s."
        ),
        Para(
            f"LoRA r={fmt_g(cfg.get('rank'))}, alpha={fmt_g(cfg.get('alpha'))}, dropout="
            f"{fmt_g(cfg.get('dropout'))}, targets `{fmt_g(cfg.get('target_modules'))}`; lr "
            f"{fmt_g(cfg.get('lr'))}, batch {fmt_g(cfg.get('batch_size'))}, epochs "
            f"{fmt_g(cfg.get('epochs'))}"
            f"{', max steps ' + str(cfg['max_steps']) if cfg.get('max_steps') else ''}, "
            f"max length {fmt_g(cfg.get('max_length'))}, split seed "
            f"{fmt_g(cfg.get('split_seed'))}, training seed{'s' if several else ''} "
            f"{', '.join(map(str, seeds))}; loss and perplexity on "
            f"{'answer tokens only' if cfg.get('answer_only') else 'all tokens'}."
        ),
        Para(
            "LoRA init: each domain adapter has its own seed (`--seed-per-domain`)."
            if results.seed_per_domain
            else "LoRA init: within a seed every adapter starts from the same init (as with the "
            "paper's HF Trainer scripts), so the domain adapters share their initial A; "
            "`--seed-per-domain` gives each its own."
        ),
    ]
    sample = results.sample
    if sample:
        blocks.append(
            Para(
                f"Combinations: {sample['description']}, the same for every training seed. "
                "Correlations and statistics below are over these combinations only; rerun "
                "without `--sample` for the whole grid (finished units are reused)."
            )
        )
    if results.config:
        blocks.append(
            Code(
                "resolved configuration (JSON)",
                json.dumps(results.config, indent=2, default=str),
            )
        )
    return blocks


def _headline(results: Results | dict) -> list:
    results = as_results(results)
    seeds = results.seeds or []
    rows = [
        [
            combo_label(r.domains),
            fmt_ci(r, "rms_cosine", 4),
            fmt(r.ppl_base),
            fmt_ci(r, "ppl_merged"),
            fmt_ci(r, "ppl_sum"),
            fmt_ci(r, "delta_pct", 2, True),
        ]
        for r in results.combinations
    ]
    deltas = [r.delta_pct for r in results.combinations]
    finite = [i for i, d in enumerate(deltas) if plots.is_number(d)]
    marked = {(max(finite, key=lambda i: deltas[i]), 5)} if finite else set()
    return [
        Para(
            f"Means over {len(seeds)} seeds, [95% t-interval of the mean]."
            if len(seeds) > 1
            else "One seed: no confidence intervals (`--seeds 1,2,3` adds them)."
        ),
        Table(
            ["combination", "RMS cosine", "ppl base", "ppl merged", "ppl sum", "Δ%"],
            rows,
            "lrrrrr",
            marked=marked,
        ),
        Para(
            "Δ% = (ppl sum − ppl merged) / ppl merged × 100: negative means the naive sum beats "
            "merged-data training, positive means the adapters interfere (largest in bold)."
        ),
    ]


def _stat_caption(name: str, stats: dict) -> str:
    pts = stats.get("points") or {}
    boot, fit = pts.get("bootstrap") or {}, pts.get("fit") or {}
    parts = [f"{boot.get('n', fit.get('n', '?'))} points"]
    if boot.get("n_groups") is not None:
        parts[0] += f" in {boot['n_groups']} combinations"
    conf = boot.get("confidence", 0.95)
    parts.append(
        f"Pearson r = {fmt_interval(boot.get('pearson_r'), (boot.get('pearson_low'), boot.get('pearson_high')))}"
    )
    parts.append(
        f"Spearman ρ = {fmt_interval(boot.get('spearman_rho'), (boot.get('spearman_low'), boot.get('spearman_high')))}"
    )
    if boot.get("pearson_low") is not None:
        parts[-1] += (
            f" ({conf:.0%} bootstrap intervals, {boot.get('n_resamples', 0):,} resamples of "
            "whole combinations)"
        )
    if fit.get("slope") is not None:
        se = fit.get("slope_stderr")
        parts.append(
            f"slope {fmt(fit['slope'], 2)}{' ± ' + fmt(se, 2) + ' (SE)' if se is not None else ''}"
            f" Δ% per unit, intercept {fmt(fit.get('intercept'), 2, True)}"
        )
    means = (stats.get("seed_means") or {}).get("bootstrap") or {}
    if means.get("pearson_r") is not None:
        parts.append(f"on combination means r = {fmt(means['pearson_r'], 2)}")
    label = plots.PREDICTOR_LABELS.get(name, f"`{name}`")
    return f"Δ% against {label}: " + "; ".join(parts) + "."


def _scatter(results: Results | dict) -> list:
    """One panel per predictor with statistics; RMS cosine always (from ``correlation``, line
    only, when the statistics do not cover it)."""
    results = as_results(results)
    stats = results.statistics or {}
    names = [n for n in stats if stats[n]]
    blocks: list = []
    if not names:
        blocks.append(Note("no `statistics` in these results: no intervals or band, line only."))
    if "rms_cosine" not in names:
        c = results.correlation
        png = plots.delta_vs_predictor(results, "rms_cosine")
        if png:
            blocks.append(
                Figure(
                    "delta_vs_rms_cosine",
                    png,
                    f"Δ% against RMS cosine over {c.n} points: Pearson r = "
                    f"{fmt(c.pearson_r, 3)} (p = {fmt(c.p_value, 3)}), least squares Δ% = "
                    f"{fmt(c.slope, 1)} · cos {fmt(c.intercept, 2, True)}.",
                )
            )
    for name in names:
        png = plots.delta_vs_predictor(results, name)
        if png:
            blocks.append(Figure(f"delta_vs_{name}", png, _stat_caption(name, stats[name])))
        else:
            blocks.append(Note(f"no combination has a value of `{name}`."))
    return blocks


def _cosine(results: Results | dict) -> list:
    results = as_results(results)
    pairs = pair_means(results.pairs)
    png = plots.cosine_heatmap(results)
    blocks: list = []
    if png:
        blocks.append(
            Figure("cosine_heatmap", png, "RMS cosine over modules between domain adapters.")
        )
    several = len(results.seeds or []) > 1
    blocks.append(
        Table(
            ["pair", "RMS cosine over modules", "whole-adapter cosine", "max abs module cosine"]
            if not several
            else ["pair", "RMS cosine (mean)", "whole-adapter cosine (mean)", "max abs module"],
            [
                [
                    f"{p['a']} · {p['b']}",
                    fmt(p["rms_cosine"], 4),
                    fmt(p["global_cosine"], 4, True),
                    fmt(p["max_abs"], 4),
                ]
                for p in pairs
            ],
            "lrrr",
            collapsed=f"every pair ({len(pairs)} rows)" if len(pairs) > 12 else "",
        )
    )
    return blocks


def _cross_domain(results: Results | dict) -> list:
    cross = as_results(results).cross_domain
    if not cross:
        return [Note("no `cross_domain` perplexities in these results (older study).")]
    png = plots.cross_domain_heatmap(cross)
    if not png:
        return [Note("`cross_domain` holds no adapters or domains.")]
    return [
        Figure(
            "cross_domain",
            png,
            "Perplexity (number) of every adapter on every domain's test split, mean over "
            "seeds; colour: log₂ of the ratio to the base model on that domain (green = better "
            "than base).",
        )
    ]


def read_train_curves(run_dir: Path) -> dict[str, list]:
    """``{"seed-<s>/<unit>": [[step, loss], ...]}`` from the adapters' train_log.jsonl files."""
    out: dict[str, list] = {}
    for log in sorted(Path(run_dir).glob("seed-*/adapters/*/train_log.jsonl")):
        pts = []
        with contextlib.suppress(OSError, ValueError):
            for line in log.read_text().splitlines():
                row = json.loads(line) if line.strip() else {}
                if "step" in row and "loss" in row:
                    pts.append([row["step"], row["loss"]])
        if pts:
            out[f"{log.parent.parent.parent.name}/{log.parent.name}"] = pts
    return out


def _curves(results: Results | dict, run_dir: Path | None) -> list:
    curves = as_results(results).train_curves or (read_train_curves(run_dir) if run_dir else {})
    png = plots.train_curves(curves) if curves else None
    if not png:
        return [Note("no training-loss logs in these results or beside them.")]
    n = len({k.partition("/")[2] for k in curves})
    return [
        Figure(
            "train_curves",
            png,
            f"Training loss per optimizer step of all {n} adapters (one line per seed).",
        )
    ]


def _per_domain(results: Results | dict) -> list:
    results = as_results(results)
    several = len(results.seeds or []) > 1
    blocks: list = []
    png = plots.per_domain_bars(results)
    if png:
        blocks.append(
            Figure(
                "per_domain",
                png,
                "Test perplexity per member domain of each combination: base model, that "
                "domain's single adapter, the merged-data adapter and the naive sum"
                + (" (means over seeds)." if several else "."),
            )
        )
    rows = []
    for r in results.combinations:
        for d, v in (r.per_domain or {}).items():
            rows.append(
                [
                    combo_label(r.domains),
                    d,
                    fmt(v.ppl_base),
                    fmt(v.ppl_single),
                    fmt(v.ppl_merged),
                    fmt(v.ppl_sum),
                    fmt(v.delta_pct, 2, True),
                ]
            )
    if not rows:
        return [Note("no per-domain perplexities in these results.")]
    blocks.append(
        Table(
            ["combination", "domain", "ppl base", "ppl single", "ppl merged", "ppl sum", "Δ%"],
            rows,
            "llrrrrr",
            collapsed=f"per-domain numbers ({len(rows)} rows)" if len(rows) > 12 else "",
        )
    )
    return blocks


def _methods(results: Results | dict) -> list:
    results = as_results(results)
    rows = [r for r in results.combinations if r.methods]
    if not rows:
        return [Note("no `methods` per combination in these results (only the naive sum).")]
    names: list[str] = []
    category: dict[str, str] = {}
    for r in rows:
        for m, v in r.methods.items():
            if m not in names:
                names.append(m)
                category[m] = v.category or ""
    # the longer list runs down the side; with many methods across, cells drop the interval
    across_methods = len(rows) > len(names)
    brief = across_methods and len(names) > 6

    def cell(m: str, r) -> str:
        v = r.methods.get(m)
        if v is None:
            return "–"
        text = fmt_delta(v.delta_pct, v.ci95, brief)
        return "★ " + text if best_method_of(r) == m else text

    if across_methods:
        header = ["combination"] + [f"{m} ({category[m]})" if category[m] else m for m in names]
        table_rows = [[combo_label(r.domains)] + [cell(m, r) for m in names] for r in rows]
        marked = {
            (j, 1 + names.index(b)) for j, r in enumerate(rows) if (b := best_method_of(r)) in names
        }
        align = "l" + "r" * len(names)
    else:
        header = ["method", "kind"] + [combo_label(r.domains) for r in rows]
        table_rows = [[m, category[m]] + [cell(m, r) for r in rows] for m in names]
        marked = {
            (names.index(b), 2 + j) for j, r in enumerate(rows) if (b := best_method_of(r)) in names
        }
        align = "ll" + "r" * len(rows)
    wins: dict[str, int] = {}
    for r in rows:
        if (b := best_method_of(r)) is not None:
            wins[b] = wins.get(b, 0) + 1
    return [
        Table(header, table_rows, align, marked=marked),
        Para(
            "Δ% of each method's perplexity vs the merged-data adapter on the combination's test "
            "set (lower is better; ★ = best per combination"
            + (", [95% interval over seeds]" if len(results.seeds or []) > 1 and not brief else "")
            + "). Best counts: "
            + ", ".join(f"`{m}` {k}" for m, k in sorted(wins.items(), key=lambda kv: -kv[1]))
            + "."
        ),
        *_routes(results),
    ]


ROUTE_SERVING = (
    "Routing needs, at serving time, every single adapter loaded and a choice per request "
    "(llama.cpp with several `--lora` files and per-request scales, or vLLM / LoRAX "
    "per-request adapters), where a composed adapter is one file."
)


MIXTURE_NOTE = (
    " `mixture`: `gaussian`'s router made soft, each row scored by the mixture of the adapters' "
    "answer likelihoods weighted by the router's tempered posterior (routed right: its top "
    "weight); a request the router is unsure of runs each adapter it keeps and mixes their "
    "next-token distributions at every step, the weights updated by the tokens so far "
    "(PEFT with several adapters serves it; per-request multi-LoRA servers run one adapter "
    "per request, so they serve its sure requests only)."
)


ARROW_NOTE = (
    " `arrow`: PEFT's Arrow, per token inside every LoRA layer the adapters whose ΔW's top "
    "right singular vector aligns with the hidden state, mixed by a softmax (all adapters, "
    "no per-row choice: routed right n/a); it needs every adapter loaded and a per-token mix "
    "in every layer, which neither llama.cpp's static `--lora` scales nor per-request "
    "multi-LoRA serving (vLLM, LoRAX) does: PEFT (transformers) serves it."
)


def _routes(results: Results) -> list:
    """Routing instead of adding (study option `routes`): combination × route, Δ% vs
    merged-data training and routing accuracy; nothing when the study ran no route."""
    rows = [r for r in results.combinations if r.routes]
    if not rows:
        return []
    names = list(dict.fromkeys(n for r in rows for n in r.routes))
    header = ["combination"] + [f"{n}: Δ% · routed right" for n in names]

    def cell(r, n: str) -> str:
        v = r.routes.get(n)
        if v is None:
            return "–"
        acc = v.routing_accuracy
        return f"{fmt_delta(v.delta_pct, v.ci95)} · " + (
            "n/a" if acc is None else f"{fmt(acc, 0)}%"
        )

    table_rows = [[combo_label(r.domains)] + [cell(r, n) for n in names] for r in rows]
    return [
        Table(header, table_rows, "l" + "r" * len(names)),
        Para(
            "Routing instead of adding: each test row scored by one single adapter, never their "
            "sum; Δ% vs the merged-data adapter and the share of rows routed to their own "
            "domain's adapter. `oracle`: each row's own adapter (the upper bound); `nearest`: "
            "the adapter whose training-prompt centroid (base model's mean last-layer hidden "
            "state) is closest in cosine to the row's prompt; `gaussian`: the adapter under "
            "whose diagonal Gaussian of its domain's first training prompts' hidden states the "
            "row's prompt is likeliest. "
            + ROUTE_SERVING
            + (MIXTURE_NOTE if "mixture" in names else "")
            + (ARROW_NOTE if "arrow" in names else "")
        ),
    ]


def _prediction(results: Results | dict) -> list:
    results = as_results(results)
    pred = results.prediction
    if not pred:
        return [Note("no leave-one-combination-out `prediction` in these results.")]
    png = plots.predicted_vs_measured(pred, plots.combo_colors(results))
    if not png:
        return [Note("`prediction` holds no points.")]
    summary = "; ".join(
        f"`{n}`: r = {fmt(p.get('pearson_r'), 2)}, ρ = {fmt(p.get('spearman_rho'), 2)}"
        + (
            f", mean |error| {fmt(p['mean_abs_error'], 2)} percentage points"
            if plots.is_number(p.get("mean_abs_error"))
            else ""
        )
        + f" (n = {len(p.get('points') or [])})"
        for n, p in pred.items()
    )
    return [
        Figure(
            "predicted_vs_measured",
            png,
            "Δ% predicted by a line fitted on the other combinations (leave one combination "
            "out) against the measured Δ%; dashed: perfect prediction. "
            + summary
            + "."
            + _oracle(pred),
        )
    ]


def _oracle(pred: dict) -> str:
    """The ρ of ranking the combinations correctly (`forecast.oracle_rho`), once when every
    predictor has the same points."""
    values = {n: p.get("oracle_rho") for n, p in pred.items()}
    shown = {fmt(v, 2) for v in values.values() if plots.is_number(v)}
    if not shown:
        return ""
    what = (
        next(iter(shown))
        if len(shown) == 1
        else ", ".join(f"`{n}` {fmt(v, 2)}" for n, v in values.items() if plots.is_number(v))
    )
    return (
        f" A predictor that knew each combination's mean Δ% exactly (ranks the combinations "
        f"correctly) but nothing of each seed's luck would reach ρ = {what}; a ρ well below "
        "it is the predictor's shortfall, not the seeds' noise."
    )


def _decomposition(results: Results | dict) -> list:
    """Δ% vs merged-data training = the sum vs each domain's own adapter × merged-data
    training's gain over those adapters; and how well each predictor ranks each factor."""
    results = as_results(results)
    rows = [r for r in results.combinations if r.delta_vs_singles_pct is not None]
    if not rows:
        return [Note("these results predate the split of Δ% (no `delta_vs_singles_pct`).")]
    table = [
        [
            combo_label(r.domains),
            fmt_ci(r, "delta_vs_singles_pct", 2, True),
            fmt_ci(r, "merged_gain_pct", 2, True),
            fmt_ci(r, "delta_pct", 2, True),
        ]
        for r in rows
    ]
    blocks: list = [
        Table(
            ["combination", "sum vs own adapters", "merged-data gain over own adapters", "Δ%"],
            table,
            "lrrr",
        ),
        Para(
            "Per seed, (1 + Δ%/100) = (1 + sum vs own adapters/100) × (1 + merged-data gain/100) "
            "exactly (the means over seeds shown here multiply out only approximately), all in "
            "percent of perplexity on the combination's test set: *sum vs own adapters* compares the sum "
            "with each domain's test rows scored by that domain's own adapter (negative: the "
            "sum helps each domain beyond its own adapter); *merged-data gain* is how much "
            "better merged-data training is than those adapters. A predictor can only see the "
            "adapters, so the first factor is the one it can be expected to rank."
        ),
    ]
    vs_merged = results.prediction or {}
    vs_singles = results.prediction_vs_singles or {}
    vs_accuracy = results.prediction_vs_accuracy  # studies with accuracy only
    if vs_singles:
        acc_header = ["LOO ρ: Δ accuracy of the sum"] if vs_accuracy is not None else []
        blocks.append(
            Table(
                [
                    "predictor",
                    "LOO ρ: Δ% vs merged",
                    "LOO ρ: sum vs own adapters",
                    "LOO mean absolute error: sum vs own adapters (points)",
                    *acc_header,
                ],
                [
                    [
                        f"`{n}`",
                        fmt((vs_merged.get(n) or {}).get("spearman_rho"), 2),
                        fmt(p.get("spearman_rho"), 2),
                        fmt(p.get("mean_abs_error"), 2),
                    ]
                    + (
                        [fmt((vs_accuracy.get(n) or {}).get("spearman_rho"), 2)]
                        if vs_accuracy is not None
                        else []
                    )
                    for n, p in vs_singles.items()
                ],
                "lrrr" + "r" * len(acc_header),
            )
        )
    return blocks


def _variants(results: Results | dict) -> list:
    results = as_results(results)
    triples = [r for r in results.combinations if r.paper_variants]
    if not triples:
        if any(len(r.domains) > 2 for r in results.combinations):
            return [Note("no `paper_variants` for the triples in these results.")]
        return [Note("no combination of three or more domains in this study.")]
    rows = []
    for r in triples:
        rows.append(
            [
                combo_label(r.domains),
                "sum of the singles",
                fmt(r.ppl_sum),
                fmt_ci(r, "delta_pct", 2, True),
            ]
        )
        for v in r.paper_variants:
            rows.append(
                [
                    "",
                    f"merged-data {combo_label(v.pair)} + single {v.third}",
                    fmt(v.ppl),
                    fmt_delta(v.delta_pct, v.ci95),
                ]
            )
    return [
        Table(["triple", "composition", "ppl", "Δ% vs triple merged-data"], rows, "llrr"),
        Para(
            "The paper's variant: the merged-data adapter of two domains summed with the single "
            "adapter of the third, against the adapter trained on all three domains' data."
        ),
    ]


def _data_training(results: Results | dict) -> list:
    results = as_results(results)
    data, singles = results.data or {}, results.singles or {}
    names = [n for n in results.domains if n in data and n in singles and singles[n].train]
    if not names:
        return [Note("no per-domain data and training records in these results.")]
    rows = []
    for n in names:
        fp, single = data[n], singles[n]
        ms = single.train
        mean = lambda k, ms=ms: sum(m.get(k) or 0.0 for m in ms) / len(ms)  # noqa: E731
        rows.append(
            [
                n,
                str(fp["train"]["n"]),
                str(fp["test"]["n"]),
                f"`{fp['test']['sha256']}`",
                str(ms[0]["steps"]),
                fmt_tokens(ms[0]),
                str(single.tokens if single.tokens is not None else "n/a"),
                f"{fmt(mean('first_loss'))} → {fmt(mean('final_loss'))}",
                fmt(mean("tokens_per_second"), 0),
            ]
        )
    blocks: list = [
        Table(
            [
                "domain",
                "train rows",
                "test rows",
                "test split hash",
                "adapter steps",
                "train tokens (all / in loss)",
                "test tokens in ppl",
                "first → last loss",
                "train tok/s",
            ],
            rows,
            "lrrlrrrrr",
        )
    ]
    merged = results.merged_training or {}
    if merged:
        blocks.append(
            Para(
                "Merged-data adapters (one epoch over the union of their domains' training rows): "
                + "; ".join(
                    f"{u.removeprefix('merged-')} {ms[0]['steps']} steps, {fmt_tokens(ms[0])} tokens"
                    for u, ms in merged.items()
                )
                + "."
            )
        )
    return blocks


def _budget(results: Results | dict) -> list:
    """Under which training budget Δ% was measured, beside each side's training compute."""
    results = as_results(results)
    tb = results.training_budget
    if not tb:
        return [Note("these results predate training budgets: every adapter took one epoch.")]
    by_combo = {tuple(r.domains): r for r in results.combinations}
    rows = []
    for c in tb.combinations or []:
        row = by_combo.get(tuple(c.domains))
        best = row.best_method if row else None
        rows.append(
            [
                combo_label(c.domains),
                " + ".join(f"{s:g}" for s in c.single_steps_mean),
                f"{c.merged_steps_mean:g}",
                f"{c.single_tokens_mean:,.0f}",
                f"{c.merged_tokens_mean:,.0f}",
                fmt_ci(row, "delta_pct", signed=True) if row else "n/a",
                f"{best} {fmt(row.methods[best].delta_pct, signed=True)}" if best else "n/a",
            ]
        )
    blocks: list = [
        Para(f"Budget **{tb.name}**: {tb.rule}."),
        Table(
            [
                "combination",
                "single steps",
                "merged steps",
                "sum-side tokens",
                "merged tokens",
                "Δ% sum",
                "best method Δ%",
            ],
            rows,
            "lrrrrrr",
        ),
        Para(
            "Single adapters are trained once and reused by every combination that contains "
            "them; a merged-data adapter serves its combination alone. Tokens: every non-padding "
            "token processed in training (means over seeds)."
        ),
    ]
    if tb.name == "converged":
        blocks += _stopping(tb.adapters or {}, results.seeds or [])
    snaps = results.snapshots
    if snaps:
        png = plots.delta_vs_length(snaps)
        if png:
            blocks.append(
                Figure(
                    "delta_vs_length",
                    png,
                    "Δ% against training length, from snapshots along one run per adapter "
                    f"(epochs {', '.join(f'{e:g}' for e in snaps.epochs)}; a snapshot is "
                    "taken mid-schedule, its learning rate not yet decayed). Left: singles and "
                    "merged adapter after equal epochs; right: after equal optimizer steps.",
                )
            )
        steps_rows = [
            [
                c.combination,
                f"{p['steps']}",
                f"{p['single_epochs']:g} / {p['merged_epochs']:g}",
                fmt_interval(
                    p["delta_pct"]["sum"]["mean"], p["delta_pct"]["sum"]["ci95"], signed=True
                ),
            ]
            for c in snaps.combinations or []
            for p in c.equal_steps or []
        ]
        if steps_rows:
            blocks.append(
                Table(
                    ["combination", "steps per adapter", "epochs single / merged", "Δ% sum"],
                    steps_rows,
                    "lrrr",
                )
            )
    return blocks


def _stopped_by(adapter: dict) -> str:
    """patience or cap; results.json files from before ``stopped_by`` have ``stopped_early``."""
    return adapter.get("stopped_by") or ("patience" if adapter.get("stopped_early") else "cap")


def _stopping(adapters: dict[str, list[dict]], seeds: list) -> list:
    """Under the converged budget: what ended each adapter's training (its stop step, the
    kept best step, patience or the cap) and how many ended each way."""
    rows, ended = [], {"patience": 0, "cap": 0}
    for unit, per_seed in adapters.items():
        for i, a in enumerate(per_seed):
            by = _stopped_by(a)
            ended[by] = ended.get(by, 0) + 1
            seed = seeds[i] if i < len(seeds) else "n/a"
            stop = a.get("stop_step", a.get("steps"))
            schedule = a.get("schedule") or "linear"
            rows.append([unit, str(seed), f"{stop}", f"{a.get('best_step')}", by, schedule])
    if not rows:
        return []
    n, cap = len(rows), ended["cap"]
    sentence = (
        f"Of the {n} adapter trainings, {ended['patience']} were stopped by patience (the "
        f"validation loss stopped improving) and {cap} by the cap (train.max_epochs)."
    )
    if cap > n / 2:
        sentence += (
            " Most ran to the cap: their validation loss had still improved within the last "
            "train.patience evaluations, so they may not have converged; raise train.max_epochs."
        )
    headers = ["adapter", "seed", "stop step", "best step", "stopped by", "schedule"]
    return [Para(sentence), Table(headers, rows, "lrrrll")]


def _split(s: dict, part: str) -> tuple[str, str]:
    """(rows, sha256) of one split of a domain, from a data fingerprint
    (``{"train": {"n", "sha256"}, "test": {...}}``), the manifest's summary (``{"train": n,
    "test": n, "sha256": {split: hash}}``) or an older flat ``{..., "sha256": test hash}``."""
    v = s.get(part)
    if isinstance(v, dict):
        return str(v.get("n", "n/a")), str(v.get("sha256", "n/a"))
    rows = str(v if v is not None else "n/a")
    h = s.get("sha256")
    if isinstance(h, dict):
        return rows, str(h.get(part, "n/a"))
    return rows, str(h or "n/a") if part == "test" else ""


def _unit_blocks(m: dict, results: Results) -> list:
    """Time per kind of unit and the table of every unit's time (from the manifest, or
    rebuilt from the training records of older results); empty when none."""
    blocks: list = []
    units = m.get("units")
    if units is None:
        units = [
            {"unit": u, "seed": t.get("seed"), "kind": "train", "seconds": t.get("seconds")}
            for u, ts in [(n, s.train or []) for n, s in (results.singles or {}).items()]
            + list((results.merged_training or {}).items())
            for t in ts
        ]
    if units:
        totals: dict[str, float] = {}
        for u in units:
            totals[u["kind"]] = totals.get(u["kind"], 0.0) + (u.get("seconds") or 0.0)
        blocks.append(
            Para(
                "Time per kind of unit: "
                + ", ".join(f"{k} {v:.0f} s" for k, v in totals.items())
                + f" ({len(units)} units)."
            )
        )
        blocks.append(
            Table(
                ["unit", "seed", "kind", "seconds"],
                [
                    [
                        u["unit"],
                        "" if u.get("seed") is None else str(u["seed"]),
                        u["kind"],
                        fmt(u.get("seconds"), 1),
                    ]
                    for u in units
                ],
                "lrlr",
                collapsed=f"time of every unit ({len(units)} rows)" if len(units) > 10 else "",
            )
        )
    return blocks


def _budget_blocks(results: Results) -> list:
    """The training budget: a list of its settings, or its JSON when nested."""
    blocks: list = []
    budget = results.budget
    if isinstance(budget, dict) and all(isinstance(v, str | int | float) for v in budget.values()):
        blocks.append(Para("Budget:"))
        blocks.append(Bullets([f"**{k.replace('_', ' ')}**: {v}" for k, v in budget.items()]))
    elif budget:
        blocks.append(Code("budget (JSON)", json.dumps(budget, indent=2, default=str)))
    return blocks


def _manifest(results: Results | dict) -> list:
    """Versions, hardware, seeds, data splits, unit times and budget: what the run was."""
    results = as_results(results)
    m = results.manifest or {}  # free-form: versions, hardware, seeds, splits, units
    blocks: list = []
    if not m:
        blocks.append(Note("no `manifest` in these results: shown what they record."))
    versions = m.get("versions") or {"lorasum": results.lorasum_version or "n/a"}
    blocks.append(
        Para("Versions: " + ", ".join(f"`{k}` {v or 'n/a'}" for k, v in versions.items()) + ".")
    )
    hw = m.get("hardware")
    if hw:
        workers = f", {hw['workers']} worker process(es)" if hw.get("workers") else ""
        precision = f", precision {hw['precision']}" if hw.get("precision") else ""
        blocks.append(
            Para(
                f"Hardware: {hw.get('cpu') or 'n/a'}, {hw.get('cores') or 'n/a'} cores, device "
                f"`{hw.get('device') or 'n/a'}`{precision}, {hw.get('torch_threads') or 'n/a'} "
                f"torch threads{workers}."
            )
        )
    seeds = m.get("seeds") or results.seeds or []
    blocks.append(
        Para(
            f"Seeds: {', '.join(map(str, seeds)) or 'n/a'}; wall time "
            f"{fmt(m.get('wall_seconds', results.wall_seconds), 0)} s."
        )
    )
    splits = m.get("splits") or results.data or {}
    if splits:
        rows = []
        for d, s in splits.items():
            (n_train, h_train), (n_test, h_test) = _split(s, "train"), _split(s, "test")
            rows.append([d, n_train, f"`{h_train}`" if h_train else "", n_test, f"`{h_test}`"])
        blocks.append(
            Table(
                ["domain", "train rows", "train sha256", "test rows", "test sha256"],
                rows,
                "lrlrl",
            )
        )
    blocks += _unit_blocks(m, results)
    blocks += _budget_blocks(results)
    return blocks


HOW_TO_READ = [
    "**ppl** is perplexity = exp(total negative log-likelihood / number of counted tokens) on the "
    "test split, counting answer tokens (and the closing EOS) only, never padding; for a "
    "combination the test set is the union of its domains' test splits, token-weighted.",
    "**merged-data** is one LoRA trained on the concatenated training data of the combination, "
    "with the same hyper-parameters as the single-domain adapters.",
    "**naive sum** adds the domain adapters' weight deltas, ΔW = Σ s·B·A, exactly (no training, "
    "no SVD).",
    "**Δ%** = (ppl_sum − ppl_merged) / ppl_merged × 100: negative means the sum beats merged-data "
    "training, positive means the adapters interfere.",
    "**RMS cosine** is the root-mean-square over adapted modules of the cosine similarity between "
    "two adapters' ΔW (0 = orthogonal); for three or more domains, the RMS over the pairs. The "
    "paper predicts Δ% to grow roughly linearly with it.",
    "With a handful of points, r is descriptive; its p-value assumes independent points, which "
    "seeds of one combination are not: the bootstrap intervals resample whole combinations.",
]


def build_report(results: Results | dict, run_dir: str | Path | None = None) -> list[Section]:
    """The report's sections, figures included (PNG bytes). ``run_dir``: where to look for
    train_log.jsonl files when ``results`` has no ``train_curves``."""
    results = as_results(results)
    run_dir = Path(run_dir) if run_dir is not None else None
    several = len(results.seeds or []) > 1
    return [
        Section("Settings", "settings", _settings(results)),
        Section("Composition vs merged-data training", "headline", _headline(results)),
        Section("What this means", "meaning", what_this_means(results)),
        Section("The paper vs this run", "paper", paper_vs_run(results)),
        Section("Δ% against the predictors", "scatter", _scatter(results)),
        Section("Merge methods × combinations", "methods", _methods(results)),
        *(
            [Section("Task accuracy vs perplexity", "accuracy", accuracy_blocks(results))]
            if results.accuracy
            else []
        ),
        Section("Predicted vs measured Δ%", "prediction", _prediction(results)),
        Section("What Δ% is made of", "decomposition", _decomposition(results)),
        Section("Triples: the paper's variants", "variants", _variants(results)),
        Section(
            "Orthogonality of the domain adapters" + (" (means over seeds)" if several else ""),
            "cosine",
            _cosine(results),
        ),
        Section("Cross-domain perplexity", "cross", _cross_domain(results)),
        Section("Per-domain perplexity", "per-domain", _per_domain(results)),
        Section("Training loss", "curves", _curves(results, run_dir)),
        Section("Training budget", "budget", _budget(results)),
        Section("Data and training", "data", _data_training(results)),
        Section("Run manifest", "manifest", _manifest(results)),
        Section("How to read these numbers", "how", [Bullets(HOW_TO_READ)]),
    ]
