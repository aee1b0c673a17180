"""The report's reading of the numbers: this run against the paper's pairs, and the
"what this means" paragraph (which pairs interfere, whether Δ% rises with RMS cosine here as
the paper found, and how strong the evidence is), all generated from the results.
"""

from __future__ import annotations

from lorasum import plots
from lorasum.report_blocks import (
    Bullets,
    Note,
    Para,
    Table,
    _delta,
    _excludes_zero,
    _f,
    _interval,
    _name,
)

# The paper's pair results (Δ% of naive sum vs merged-data training), arXiv 2508.11985.
PAPER_PAIR_DELTA = {
    ("math", "medicine"): -9.10,
    ("math", "finance"): 4.54,
    ("finance", "medicine"): 27.56,
}
PAPER_SETUP = {"model": "GPT-2 small (117M)", "lr": 5e-5}


def _best_method(row: dict) -> str | None:
    methods = row.get("methods") or {}
    best = row.get("best_method")
    if best in methods:
        return best
    ok = {m: v["ppl"] for m, v in methods.items() if plots.is_number(v.get("ppl"))}
    return min(ok, key=ok.get) if ok else None


def _paper_rows(results: dict) -> list[dict]:
    given = (results.get("paper_comparison") or {}).get("rows")
    if given:
        return given
    by_pair = {frozenset(r["domains"]): r for r in results["combinations"]}
    out = []
    for (a, b), paper in PAPER_PAIR_DELTA.items():
        r = by_pair.get(frozenset((a, b)))
        out.append(
            {
                "pair": f"{a}+{b}",
                "paper_delta_pct": paper,
                "delta_pct": r["delta_pct"] if r else None,
                "ci95": (r.get("ci95") or {}).get("delta_pct") if r else None,
            }
        )
    return out


def _differences(results: dict) -> list[str]:
    given = (results.get("paper_comparison") or {}).get("differences")
    if given:
        return list(given)
    cfg = results["train_config"]
    out = [
        f"Model `{results['model']}` here, {PAPER_SETUP['model']} in the paper.",
        "Data: "
        + ", ".join(f"`{n}` = {s}" for n, s in results["domains"].items())
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
    if ci and ci[0] is not None and ci[1] is not None and not _excludes_zero(*ci):
        return f"{same} (interval spans 0)"
    return same


def _paper(results: dict) -> list:
    rows = _paper_rows(results)
    if not any(r.get("delta_pct") is not None for r in rows):
        return [Note("none of the paper's pairs (math, medicine, finance) is in this study.")]
    table = Table(
        ["pair", "paper Δ%", "this run Δ%", "same sign as the paper"],
        [
            [
                r["pair"].replace("+", " + "),
                _f(r["paper_delta_pct"], 2, True),
                _delta(r),
                _agrees(r),
            ]
            for r in rows
        ],
        "lrrl",
    )
    return [table, Para("Differences from the paper's setup:"), Bullets(_differences(results))]


def _meaning(results: dict) -> list:
    rows = [r for r in results["combinations"] if plots.is_number(r.get("delta_pct"))]
    if not rows:
        return [Para("No combination has a finite Δ%: there is nothing to read yet.")]
    pairs = [r for r in rows if len(r["domains"]) == 2] or rows
    several = len(results.get("seeds", [])) > 1
    worst = max(pairs, key=lambda r: r["delta_pct"])
    best = min(pairs, key=lambda r: r["delta_pct"])
    kind = "pairs" if len(pairs[0]["domains"]) == 2 else "combinations"
    text = [
        f"Of the {len(pairs)} {kind}, **{_name(worst['domains'])}** interferes most: its naive "
        f"sum is {_f(worst['delta_pct'], 1, True)} % vs merged-data training "
        f"(RMS cosine {_f(worst['rms_cosine'], 3)}); **{_name(best['domains'])}** least, "
        f"{_f(best['delta_pct'], 1, True)} % (RMS cosine {_f(best['rms_cosine'], 3)})."
    ]
    worse = [r for r in rows if r["delta_pct"] > 0]
    text.append(
        f"The sum is worse than merged-data training on {len(worse)} of {len(rows)} combinations"
    )
    if several:
        ci = [(r.get("ci95") or {}).get("delta_pct") or (None, None) for r in rows]
        above = sum(lo is not None and lo > 0 for lo, _ in ci)
        below = sum(hi is not None and hi < 0 for _, hi in ci)
        text[-1] += f" ({above} with the whole 95% interval above 0, {below} with it below 0)"
    text[-1] += "."
    stats = ((results.get("statistics") or {}).get("rms_cosine") or {}).get("points") or {}
    boot = stats.get("bootstrap") or {}
    if boot.get("pearson_r") is not None:
        r, lo, hi = boot["pearson_r"], boot.get("pearson_low"), boot.get("pearson_high")
        n, groups = boot.get("n"), boot.get("n_groups")
        verdict = "rises" if r > 0 else "falls"
        text.append(
            f"Δ% {verdict} with RMS cosine here (Pearson r = {_interval(r, (lo, hi))} over {n} "
            f"points in {groups} combinations)"
            + (
                "; the paper found it rises, and "
                + (
                    "the bootstrap interval excludes 0, so this run supports that finding."
                    if _excludes_zero(lo, hi) and r > 0
                    else "the interval excludes 0 on the opposite side: this run contradicts it."
                    if _excludes_zero(lo, hi)
                    else "the bootstrap interval includes 0, so this run can neither confirm nor "
                    "refute it."
                    if lo is not None
                    else "with fewer than 3 combinations there is no interval: not evidence."
                )
            )
        )
    else:
        c = results["correlation"]
        if c.get("pearson_r") is not None:
            text.append(
                f"Δ% {'rises' if c['pearson_r'] > 0 else 'falls'} with RMS cosine here (Pearson "
                f"r = {_f(c['pearson_r'], 2)} over {c['n']} points, as the paper found "
                f"{'' if c['pearson_r'] > 0 else 'the opposite'}); with "
                f"{len(rows)} combinations and no bootstrap interval this is descriptive, "
                "not evidence"
            )
            text[-1] = text[-1].replace("found )", "found)") + "."
        else:
            text.append("There are too few points for a correlation.")
    paper = [r for r in _paper_rows(results) if r.get("delta_pct") is not None]
    if paper:
        same = sum((r["delta_pct"] > 0) == (r["paper_delta_pct"] > 0) for r in paper)
        text.append(f"The sign of Δ% matches the paper's on {same} of {len(paper)} of its pairs.")
    methods = [r for r in rows if r.get("methods")]
    if methods:
        wins: dict[str, int] = {}
        for r in methods:
            if (b := _best_method(r)) is not None:
                wins[b] = wins.get(b, 0) + 1
        top = max(wins, key=wins.get)
        text.append(
            f"Among the merge methods, `{top}` is best on {wins[top]} of {len(methods)} "
            "combinations."
        )
    return [Para(" ".join(text))]
