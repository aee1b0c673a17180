"""The report's reading of the numbers: this run against the paper's pairs, and the
"what this means" paragraph (which pairs interfere, whether Δ% rises with RMS cosine here as
the paper found, and how strong the evidence is), all generated from the results.
"""

from __future__ import annotations

from lorasum.report import plots
from lorasum.report.blocks import (
    Bullets,
    Note,
    Para,
    Table,
    combo_label,
    excludes_zero,
    fmt,
    fmt_delta,
    fmt_interval,
)
from lorasum.results_schema import Combination, Results, as_results

# The paper's pair results (Δ% of naive sum vs merged-data training), arXiv 2508.11985.
PAPER_PAIR_DELTA = {
    ("math", "medicine"): -9.10,
    ("math", "finance"): 4.54,
    ("finance", "medicine"): 27.56,
}
PAPER_SETUP = {"model": "GPT-2 small (117M)", "lr": 5e-5}


def best_method_of(row: Combination) -> str | None:
    """The combination's best method: as recorded, else the one with the lowest perplexity."""
    methods = row.methods or {}
    if row.best_method in methods:
        return row.best_method
    ok = {m: v.ppl for m, v in methods.items() if plots.is_number(v.ppl)}
    return min(ok, key=ok.get) if ok else None


def _paper_rows(results: Results) -> list[dict]:
    given = (results.paper_comparison or {}).get("rows")
    if given:
        return given
    by_pair = {frozenset(r.domains): r for r in results.combinations}
    out = []
    for (a, b), paper in PAPER_PAIR_DELTA.items():
        r = by_pair.get(frozenset((a, b)))
        out.append(
            {
                "pair": f"{a}+{b}",
                "domains": [a, b],
                "paper_delta_pct": paper,
                "delta_pct": r.delta_pct if r else None,
                "ci95": (r.ci95 or {}).get("delta_pct") if r else None,
            }
        )
    return out


def _differences(results: Results) -> list[str]:
    given = (results.paper_comparison or {}).get("differences")
    if given:
        return list(given)
    cfg = results.train_config
    out = [
        f"Model `{results.model}` here, {PAPER_SETUP['model']} in the paper.",
        "Data: "
        + ", ".join(f"`{n}` = {s}" for n, s in results.domains.items())
        + "; the paper used allenai/math_qa, MedQuad and financial-qa-10K.",
    ]
    if cfg.get("lr") != PAPER_SETUP["lr"]:
        out.append(f"Learning rate {cfg.get('lr'):g} here, {PAPER_SETUP['lr']:g} in the paper.")
    if cfg.get("max_train"):
        out.append(f"At most {cfg['max_train']} training rows per domain (preset subsample).")
    if cfg.get("answer_only"):
        out.append("Loss and perplexity count answer tokens only, never padding.")
    return out


def _agrees(row: dict) -> str:
    """Whether this run's Δ% of a pair has the paper's sign: yes, no, or unsure when the 95%
    interval over seeds spans 0."""
    if row.get("delta_pct") is None:
        return "n/a"
    same = "yes" if (row["delta_pct"] > 0) == (row["paper_delta_pct"] > 0) else "no"
    ci = row.get("ci95")
    if ci and ci[0] is not None and ci[1] is not None and not excludes_zero(*ci):
        return f"{same} (interval spans 0)"
    return same


def paper_vs_run(results: Results | dict) -> list:
    results = as_results(results)
    rows = _paper_rows(results)
    if not any(r.get("delta_pct") is not None for r in rows):
        return [Note("none of the paper's pairs (math, medicine, finance) is in this study.")]
    table = Table(
        ["pair", "paper Δ%", "this run Δ%", "same sign as the paper"],
        [
            [
                combo_label(r["domains"]) if r.get("domains") else r["pair"].replace("+", " + "),
                fmt(r["paper_delta_pct"], 2, True),
                fmt_delta(r.get("delta_pct"), r.get("ci95")),
                _agrees(r),
            ]
            for r in rows
        ],
        "lrrl",
    )
    return [table, Para("Differences from the paper's setup:"), Bullets(_differences(results))]


def _interference(rows: list[Combination], several: bool) -> list[str]:
    """Which pairs interfere most and least, and how often the sum loses."""
    pairs = [r for r in rows if len(r.domains) == 2] or rows
    worst = max(pairs, key=lambda r: r.delta_pct)
    best = min(pairs, key=lambda r: r.delta_pct)
    kind = "pairs" if len(pairs[0].domains) == 2 else "combinations"
    text = [
        f"Of the {len(pairs)} {kind}, **{combo_label(worst.domains)}** interferes most: its naive "
        f"sum is {fmt(worst.delta_pct, 1, True)} % vs merged-data training "
        f"(RMS cosine {fmt(worst.rms_cosine, 3)}); **{combo_label(best.domains)}** least, "
        f"{fmt(best.delta_pct, 1, True)} % (RMS cosine {fmt(best.rms_cosine, 3)})."
    ]
    deltas = [r.delta_pct for r in rows]
    worse = f"The sum is worse than merged-data training on {sum(d > 0 for d in deltas)} of {len(rows)} combinations"
    if several:
        ci = [(r.ci95 or {}).get("delta_pct") or (None, None) for r in rows]
        above = sum(lo is not None and lo > 0 for lo, _ in ci)
        below = sum(hi is not None and hi < 0 for _, hi in ci)
        worse += f" ({above} with the whole 95% interval above 0, {below} with it below 0)"
    text.append(
        worse + f"; Δ% averages {fmt(sum(deltas) / len(deltas), 1, True)} % "
        f"(from {fmt(min(deltas), 1, True)} to {fmt(max(deltas), 1, True)})."
    )
    higher = [r for r in rows if len(r.domains) > 2]
    if higher and len(pairs) < len(rows):
        mean_pairs = sum(r.delta_pct for r in pairs) / len(pairs)
        mean_higher = sum(r.delta_pct for r in higher) / len(higher)
        text.append(
            f"Summing three or more adapters gives {fmt(mean_higher, 1, True)} % on average, "
            f"pairs {fmt(mean_pairs, 1, True)} %."
        )
    return text


def _trend(results: Results, rows: list[Combination]) -> str:
    """Does Δ% rise with RMS cosine here, as the paper found, and how strong is the evidence."""
    stats = (results.statistics or {}).get("rms_cosine") or {}
    boot = (stats.get("points") or {}).get("bootstrap") or {}
    if boot.get("pearson_r") is not None:
        r, lo, hi = boot["pearson_r"], boot.get("pearson_low"), boot.get("pearson_high")
        head = (
            f"Δ% {'rises' if r > 0 else 'falls'} with RMS cosine here (Pearson r = "
            f"{fmt_interval(r, (lo, hi))} over {boot.get('n')} points in {boot.get('n_groups')} "
            "combinations); the paper found it rises, and "
        )
        if lo is None:
            return head + "with fewer than 3 combinations there is no interval: not evidence."
        if excludes_zero(lo, hi) and r > 0:
            return head + "the bootstrap interval excludes 0, so this run supports that finding."
        if excludes_zero(lo, hi):
            return head + "the interval excludes 0 on the opposite side: this run contradicts it."
        return (
            head
            + "the bootstrap interval includes 0, so this run can neither confirm nor refute it."
        )
    c = results.correlation
    if c.pearson_r is None:
        return "There are too few points for a correlation of Δ% with RMS cosine."
    agree = "as the paper found" if c.pearson_r > 0 else "the paper found it rises"
    return (
        f"Δ% {'rises' if c.pearson_r > 0 else 'falls'} with RMS cosine here (Pearson r = "
        f"{fmt(c.pearson_r, 2)} over {c.n} points; {agree}); with {len(rows)} combinations "
        "and no bootstrap interval this is descriptive, not evidence."
    )


def what_this_means(results: Results | dict) -> list:
    results = as_results(results)
    rows = [r for r in results.combinations if plots.is_number(r.delta_pct)]
    if not rows:
        return [Para("No combination has a finite Δ%: there is nothing to read yet.")]
    text = _interference(rows, len(results.seeds or []) > 1)
    text.append(_trend(results, rows))
    paper = [r for r in _paper_rows(results) if r.get("delta_pct") is not None]
    if paper:
        same = sum((r["delta_pct"] > 0) == (r["paper_delta_pct"] > 0) for r in paper)
        text.append(f"The sign of Δ% matches the paper's on {same} of {len(paper)} of its pairs.")
    variants = [
        (r, v) for r in rows for v in r.paper_variants or [] if plots.is_number(v.delta_pct)
    ]
    if variants:
        r, v = min(variants, key=lambda rv: rv[1].delta_pct)
        text.append(
            f"For {combo_label(r.domains)}, the paper's best variant, merged-data "
            f"{combo_label(v.pair)} + single {v.third}, gives {fmt(v.delta_pct, 1, True)} % vs "
            f"the triple's merged-data adapter ({fmt(r.delta_pct, 1, True)} % for the plain sum "
            "of three)."
        )
    wins: dict[str, int] = {}
    for r in rows:
        if r.methods and (b := best_method_of(r)) is not None:
            wins[b] = wins.get(b, 0) + 1
    if wins:
        top = max(wins, key=wins.get)
        n = sum(1 for r in rows if r.methods)
        text.append(f"Among the merge methods, `{top}` is best on {wins[top]} of {n} combinations.")
    return [Para(" ".join(text))]
