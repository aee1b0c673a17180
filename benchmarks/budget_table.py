"""The [budget] comparison: Δ% per combination under each training budget, and each predictor's
leave-one-combination-out Spearman per budget and pooled over budgets.

    python benchmarks/budget_table.py epochs=runs/budget/epochs steps=runs/budget/steps \
        converged=runs/budget/converged [--methods sum,tsv,iso] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lorasum.report.build import load_results
from lorasum.study.budget import compare_budgets


def _fmt(d: dict | None) -> str:
    if not d or d.get("delta_pct") is None:
        return "n/a"
    ci = d.get("ci95")
    text = f"{d['delta_pct']:+.1f}"
    return f"{text} [{ci[0]:+.1f}, {ci[1]:+.1f}]" if ci and None not in ci else text


def render(table: dict, methods: list[str] | None) -> str:
    budgets = table["budgets"]
    lines = [
        "| combination | " + " | ".join(f"{b}: sum Δ% | {b}: best method" for b in budgets) + " |"
    ]
    lines.append("|---|" + "---:|---|" * len(budgets))
    for c, entry in table["combinations"].items():
        cells = []
        for b in budgets:
            e = entry.get(b)
            if e is None:
                cells += ["n/a", "n/a"]
                continue
            best = e["best_method"]
            steps = (
                f" ({'+'.join(f'{s:g}' for s in e['single_steps'] or [])} vs {e['merged_steps']:g} steps)"
                if e["merged_steps"]
                else ""
            )
            cells += [
                _fmt(e["sum"]) + steps,
                f"{best} {_fmt(e['methods'].get(best))}" if best else "n/a",
            ]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    all_methods = sorted(
        {m for e in table["combinations"].values() for b in e.values() for m in b["methods"]}
    )
    lines += ["", "Mean Δ% over combinations, per method and budget:", ""]
    lines.append("| method | " + " | ".join(budgets) + " |")
    lines.append("|---|" + "---:|" * len(budgets))
    for m in methods or all_methods:
        cells = []
        for b in budgets:
            vals = [
                e[b]["methods"][m]["delta_pct"]
                for e in table["combinations"].values()
                if b in e and m in e[b]["methods"]
            ]
            cells.append(
                f"{sum(vals) / len(vals):+.2f} ({sum(v < 0 for v in vals)}/{len(vals)} < 0)"
                if vals
                else "n/a"
            )
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "Leave-one-combination-out Spearman of predicted vs measured Δ% (sum):", ""]
    lines.append("| predictor | " + " | ".join(budgets) + " | pooled | pooled oracle ρ |")
    lines.append("|---|" + "---:|" * (len(budgets) + 2))
    for name, p in table["prediction"].items():
        f = lambda v: "n/a" if v is None else f"{v:+.2f}"  # noqa: E731
        lines.append(
            f"| {name} | "
            + " | ".join(f(p.get(b)) for b in budgets)
            + f" | {f(p.get('pooled'))} (n={p.get('pooled_n')}) | {f(p.get('pooled_oracle_rho'))} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("studies", nargs="+", help="LABEL=STUDY_DIR, one per budget")
    ap.add_argument(
        "--methods", default=None, help="methods for the per-method table (default: all)"
    )
    ap.add_argument("--json", default=None, help="also write the comparison as JSON here")
    args = ap.parse_args()
    studies = {}
    for item in args.studies:
        label, _, path = item.partition("=")
        studies[label] = load_results(Path(path)).to_dict()  # compare_budgets reads dicts
    table = compare_budgets(studies)
    print(render(table, args.methods.split(",") if args.methods else None))
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
