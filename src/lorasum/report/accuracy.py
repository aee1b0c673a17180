"""The report's task-accuracy section (studies with ``metrics: [perplexity, accuracy]``): Δ
accuracy beside Δ% per combination and method, how far the two metrics rank the methods alike,
and where the best method differs between them."""

from __future__ import annotations

from lorasum.report.blocks import Para, Table, combo_label, fmt, fmt_delta, fmt_interval
from lorasum.report.findings import best_method_of
from lorasum.report.plots import is_number
from lorasum.results_schema import AccuracySummary, Results, as_results

SCORED_BY = {
    "choice": "acc over options",
    "match": "exact match of short answers",
    "choice+match": "acc over options and exact match",
    "skip": "skipped (no options, no short answer)",
}


def _pct(x) -> str:
    return fmt(x * 100.0, 1) if is_number(x) else "n/a"


def _delta_pts(acc: dict, brief: bool) -> str:
    d, ci = acc.get("delta_pts"), None if brief else acc.get("ci95")
    if not (ci and is_number(d) and is_number(ci[0]) and is_number(ci[1]) and ci[0] <= d <= ci[1]):
        ci = None
    return fmt_interval(d, ci, 1, True)


def accuracy_blocks(results: Results | dict) -> list:
    """The section's blocks (empty when the study measured no accuracy)."""
    results = as_results(results)
    summary = results.accuracy
    rows = [r for r in results.combinations if r.accuracy]
    if not summary or not rows:
        return []
    names = list(dict.fromkeys(m for r in rows for m in r.methods or {}))
    brief = len(names) > 4
    table_rows, marked = [], set()
    for j, r in enumerate(rows):
        acc = r.accuracy  # free-form: merged, base, singles, best_methods
        best_ppl, best_acc = best_method_of(r), acc.get("best_methods") or []
        cells = [combo_label(r.domains), _pct(acc["merged"].get("score"))]
        for i, m in enumerate(names):
            v = (r.methods or {}).get(m)
            if v is None or v.accuracy is None:
                cells.append("–")
                continue
            text = f"{fmt_delta(v.delta_pct, v.ci95, True)} · {_delta_pts(v.accuracy, brief)}"
            if m in best_acc:
                text = "★ " + text
                marked.add((j, 2 + i))
            cells.append(text + (" (ppl ★)" if m == best_ppl else ""))
        table_rows.append(cells)
    blocks: list = [
        Table(
            ["combination", "merged acc %"] + [f"{m}: Δ% · Δ acc" for m in names],
            table_rows,
            "lr" + "r" * len(names),
            marked=marked,
        ),
        Para(
            "Each cell: Δ% of perplexity vs the merged-data adapter (lower is better) · **Δ "
            "accuracy** in percentage points vs the merged-data adapter (method − merged, "
            "higher is better"
            + (", [95% interval over seeds]" if len(results.seeds or []) > 1 and not brief else "")
            + "). Accuracy pools the combination's test rows, one vote per question: acc over "
            "the options of multiple-choice rows, exact match of greedy answers on short-answer "
            "rows (lm-eval conventions; docs/MANUAL.md, 'Task accuracy'). ★ = best by accuracy "
            "(ties all starred), (ppl ★) = best by perplexity."
        ),
        Para(_agreement(summary)),
    ]
    domains = summary.domains or {}
    if domains:
        blocks.append(
            Para(
                "Scored per domain: "
                + "; ".join(
                    f"`{d}` {SCORED_BY.get(v['scored_by'], v['scored_by'])}"
                    + (
                        f" ({v['questions'] + v['generated']} test rows)"
                        if v["scored_by"] != "skip"
                        else ""
                    )
                    for d, v in domains.items()
                )
                + "."
                + (
                    f" Skipped: {', '.join(f'`{d}`' for d in summary.skipped_domains)} "
                    "(their rows count in perplexity only)."
                    if summary.skipped_domains
                    else ""
                )
            )
        )
    return blocks


def _agreement(summary: AccuracySummary) -> str:
    """The rank-correlation sentence and the combinations whose best method differs."""
    corr = summary.rank_correlation or {}
    rho, n = corr.get("spearman_rho"), corr.get("n", 0)
    if is_number(rho):
        text = (
            f"Across the {n} (combination, method) rows, Spearman ρ of Δ% and Δ accuracy = "
            f"{fmt(rho, 2)} (p = {fmt(corr.get('spearman_p'), 3)}; the metrics agree when ρ is "
            "negative, since lower Δ% and higher Δ accuracy are both better)."
        )
    else:
        text = (
            f"Spearman ρ of Δ% and Δ accuracy: n/a ({n} (combination, method) rows; it needs "
            "at least 3 and both to vary)."
        )
    differs = [b for b in summary.best_method or [] if b.differs]
    if not summary.best_method:
        return text
    if not differs:
        return (
            text + " The best method by perplexity is also best by accuracy on every combination."
        )
    return (
        text
        + " The best method differs on "
        + "; ".join(
            f"{combo_label(b.domains)} (perplexity: `{b.best_by_perplexity}`, "
            f"accuracy: {', '.join(f'`{m}`' for m in b.best_by_accuracy)})"
            for b in differs
        )
        + "."
    )
