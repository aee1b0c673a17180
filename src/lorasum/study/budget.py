"""The training budget a study's Δ% was measured under, and Δ% along the training runs.

`budget_summary`: per combination, the optimizer steps, epochs and tokens of each side — the
single adapters the sum composes (trained once, reused by every combination that contains
them) and the combination's merged-data adapter (which serves that combination alone).

`snapshot_summary`: with snapshots, Δ% of the sum (and the data-free methods) at every point
along the runs, paired two ways: by equal epochs (singles and merged adapter each after ``e``
passes over their own rows) and by equal steps (every single at the step count of the merged
adapter's snapshot; for a pair of equal-sized domains, singles at 2e against merged at e).
Pure functions over the finished units' results.
"""

from __future__ import annotations

from collections.abc import Sequence

from lorasum.analysis.statistics import delta_pct
from lorasum.study import names
from lorasum.study.names import combo_name
from lorasum.study.results import ci95, mean

_ADAPTER_FIELDS = (
    "steps",
    "best_step",
    "epochs",
    "real_tokens",
    "stopped_early",
    "stop_step",
    "stopped_by",
    "schedule",
)


def adapter_budget(metrics: dict) -> dict:
    """What one adapter's training cost and what ended it, from its marker's metrics
    (best_step: the kept weights' step under the converged budget, else the last step;
    stopped_by: patience, cap or stop_at). Markers from before stop_step, stopped_by and
    schedule existed get them from the fields they had (their schedule was linear)."""
    out = {k: metrics.get(k) for k in _ADAPTER_FIELDS}
    if out["best_step"] is None:
        out["best_step"] = out["steps"]
    if out["stop_step"] is None:
        out["stop_step"] = out["steps"]
    if out["stopped_by"] is None:
        out["stopped_by"] = "patience" if out["stopped_early"] else "cap"
    if out["schedule"] is None:
        out["schedule"] = "linear"
    return out


def budget_summary(
    budget: str,
    rule: str,
    combos: Sequence[tuple[str, ...]],
    singles: dict[tuple[str, ...], list[str]],
    metrics: dict[int, dict[str, dict]],
) -> dict:
    """``singles``: combination → the single adapters (unit names) its sum composes;
    ``metrics``: seed → unit name → training metrics."""
    seeds = list(metrics)
    rows = []
    for combo in combos:
        merged = names.merged_name(combo)
        per_seed = []
        for s in seeds:
            sides = [adapter_budget(metrics[s][u]) for u in singles[combo]]
            m = adapter_budget(metrics[s][merged])
            per_seed.append(
                {
                    "seed": s,
                    "single_steps": [a["steps"] for a in sides],
                    "single_epochs": [a["epochs"] for a in sides],
                    "single_tokens": sum(a["real_tokens"] for a in sides),
                    "merged_steps": m["steps"],
                    "merged_epochs": m["epochs"],
                    "merged_tokens": m["real_tokens"],
                    "single_best_steps": [a["best_step"] for a in sides],
                    "merged_best_step": m["best_step"],
                }
            )
        rows.append(
            {
                "combination": combo_name(combo),
                "domains": list(combo),
                "singles": singles[combo],
                "single_steps_mean": [
                    mean([p["single_steps"][i] for p in per_seed]) for i in range(len(combo))
                ],
                "merged_steps_mean": mean([p["merged_steps"] for p in per_seed]),
                "single_tokens_mean": mean([p["single_tokens"] for p in per_seed]),
                "merged_tokens_mean": mean([p["merged_tokens"] for p in per_seed]),
                "per_seed": per_seed,
            }
        )
    adapters = {u: [adapter_budget(metrics[s][u]) for s in seeds] for u in metrics[seeds[0]]}
    return {"name": budget, "rule": rule, "combinations": rows, "adapters": adapters}


def snapshot_points(
    combo: tuple[str, ...],
    epochs: Sequence[float],
    evals: dict[str, dict],
    steps: dict[str, dict[float, int]],
    methods: Sequence[str],
) -> list[dict]:
    """One seed's points along the runs of one combination: at each snapshot epoch (the last
    is the finished adapters' own evaluations) the perplexities of the merged adapter and of
    every method over the singles; ``steps``: unit → epochs → optimizer step."""
    merged_name = names.merged_name(combo)
    points = []
    for i, e in enumerate(epochs):
        at = None if i == len(epochs) - 1 else e
        merged = evals[names.snapshot_name(at, merged_name)]
        ppl = {}
        for m in methods:
            unit = names.snapshot_name(at, names.composition_name(m, combo))
            if unit in evals:
                ppl[m] = evals[unit]["perplexity"]
        points.append(
            {
                "epochs": e,
                "single_steps": [steps[d][e] for d in combo],
                "merged_steps": steps[merged_name][e],
                "ppl_merged": merged["perplexity"],
                "ppl": ppl,
            }
        )
    return points


def pair_points(points: list[dict]) -> dict[str, list[dict]]:
    """Δ% per method, paired by equal epochs and by equal steps (the singles' step counts all
    equal the merged adapter's), from one seed's points of one combination."""
    equal_epochs = [
        {
            "epochs": p["epochs"],
            "single_steps": p["single_steps"],
            "merged_steps": p["merged_steps"],
            "delta_pct": {m: delta_pct(v, p["ppl_merged"]) for m, v in p["ppl"].items()},
        }
        for p in points
    ]
    equal_steps = []
    for merged in points:
        for single in points:
            if set(single["single_steps"]) != {merged["merged_steps"]}:
                continue
            equal_steps.append(
                {
                    "steps": merged["merged_steps"],
                    "single_epochs": single["epochs"],
                    "merged_epochs": merged["epochs"],
                    "delta_pct": {
                        m: delta_pct(v, merged["ppl_merged"]) for m, v in single["ppl"].items()
                    },
                }
            )
    return {"equal_epochs": equal_epochs, "equal_steps": equal_steps}


def _mean_over_seeds(per_seed: list[list[dict]], key: str) -> list[dict]:
    """Average paired points over seeds, point by point (every seed has the same points)."""
    out = []
    for i, first in enumerate(per_seed[0]):
        same = [pts[i] for pts in per_seed if i < len(pts)]
        deltas = {}
        for m in first["delta_pct"]:
            values = [p["delta_pct"][m] for p in same if m in p["delta_pct"]]
            deltas[m] = {"mean": mean(values), "ci95": ci95(values), "n": len(values)}
        out.append({**{k: v for k, v in first.items() if k != "delta_pct"}, "delta_pct": deltas})
        out[-1][key] = first[key]
    return out


def snapshot_summary(
    combos: Sequence[tuple[str, ...]],
    epochs: Sequence[float],
    seed_evals: dict[int, dict[str, dict]],
    seed_steps: dict[int, dict[str, dict[float, int]]],
    methods: Sequence[str],
) -> list[dict]:
    """Per combination: Δ% against training length, paired by equal epochs and equal steps,
    mean and 95 % interval over seeds, with each seed's points."""
    rows = []
    for combo in combos:
        paired = [
            pair_points(snapshot_points(combo, epochs, seed_evals[s], seed_steps[s], methods))
            for s in seed_evals
        ]
        rows.append(
            {
                "combination": combo_name(combo),
                "domains": list(combo),
                "equal_epochs": _mean_over_seeds([p["equal_epochs"] for p in paired], "epochs"),
                "equal_steps": _mean_over_seeds([p["equal_steps"] for p in paired], "steps"),
                # JSON keys are strings: the seeds as results.json holds them
                "per_seed": {str(s): p for s, p in zip(seed_evals, paired, strict=True)},
            }
        )
    return rows


def compare_budgets(studies: dict[str, dict]) -> dict:
    """Several studies of the same combinations under different budgets (label → results):
    per combination Δ% of the sum and of every method under each budget (mean, 95 % interval),
    each predictor's leave-one-combination-out Spearman per budget, and pooled over the
    budgets (a point per combination, seed and budget; the combination left out under every
    budget at once, so no budget's copy of it helps predict another)."""
    from lorasum.analysis.forecast import loo_predictions, oracle_rho, predictor_points
    from lorasum.analysis.statistics import pearson_spearman

    combos: dict[str, dict] = {}
    for label, res in studies.items():
        steps = {
            c["combination"]: c for c in (res.get("training_budget") or {}).get("combinations", [])
        }
        for row in res["combinations"]:
            c = combo_name(row["domains"])
            entry = combos.setdefault(c, {})
            entry[label] = {
                "sum": {
                    "delta_pct": row["delta_pct"],
                    "ci95": (row.get("ci95") or {}).get("delta_pct"),
                },
                "methods": {
                    m: {"delta_pct": v["delta_pct"], "ci95": v.get("ci95")}
                    for m, v in row.get("methods", {}).items()
                },
                "best_method": row.get("best_method"),
                "single_steps": (steps.get(c) or {}).get("single_steps_mean"),
                "merged_steps": (steps.get(c) or {}).get("merged_steps_mean"),
            }
    predictors: dict[str, dict] = {}
    pooled: dict[str, list] = {}
    for label, res in studies.items():
        for name, pred in (res.get("prediction") or {}).items():
            predictors.setdefault(name, {})[label] = pred.get("spearman_rho")
            xs, ys, groups = predictor_points(res["combinations"], name)
            pooled.setdefault(name, []).extend(zip(xs, ys, groups, [label] * len(xs), strict=True))
    for name, pts in pooled.items():
        xs, ys, groups = [p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts]
        predicted = loo_predictions(xs, ys, groups)
        ok = [(p, q) for p, q in zip(predicted, pts, strict=True) if p is not None]
        corr = pearson_spearman([p for p, _ in ok], [q[1] for _, q in ok])
        predictors[name]["pooled"] = corr["spearman_rho"]
        predictors[name]["pooled_n"] = len(ok)
        # the reference: knowing each (budget, combination)'s mean Δ% exactly
        predictors[name]["pooled_oracle_rho"] = oracle_rho(
            [q[1] for _, q in ok], [f"{q[3]}/{q[2]}" for _, q in ok]
        )
    return {"budgets": list(studies), "combinations": combos, "prediction": predictors}
