"""Task accuracy in a study (``metrics: [perplexity, accuracy]``): its numbers.

Every evaluation the study makes of an adapter on test rows (base, singles, merged-data
adapters, sums, methods, the paper's variants) gets a twin unit ``acc-<eval name>``
(`lorasum.study.tasks.AccuracyTask`): the same adapter on the same rows, scored by
`lorasum.evaluate.accuracy_of`, written to ``evals/acc-<name>.json`` with a key of its own.

Numbers: per combination and method the pooled accuracy of its domains' test rows and
**Δ accuracy** in percentage points vs the merged-data adapter (method − merged; positive =
better), mean over seeds with the t-interval Δ% uses (`results.ci95`); study-wide the Spearman
rank correlation of Δ% and Δ accuracy across (combination, method) rows and the combinations
whose best method differs between the two metrics.
"""

from __future__ import annotations

from collections.abc import Sequence

from lorasum.study import names

# Δ accuracy of each of these, in points: score (acc on options and exact match on short
# answers, one vote per question: the headline), and each metric on its own rows
DELTAS = {
    "score": "delta_pts",
    "acc": "delta_acc_pts",
    "acc_norm": "delta_acc_norm_pts",
    "exact_match": "delta_exact_match_pts",
}


def pooled(result: dict, domains: Sequence[str]) -> dict:
    """acc, acc_norm (multiple-choice questions), exact_match (short answers) and score (both,
    one vote per question) over ``domains`` of one accuracy result, question-weighted; None
    where nothing was scored."""
    per = [result["per_dataset"][d] for d in domains]
    questions = sum(p["questions"] for p in per)
    generated = sum(p["generated"] for p in per)
    correct = sum(round((p["acc"] or 0.0) * p["questions"]) for p in per)
    correct_norm = sum(round((p["acc_norm"] or 0.0) * p["questions"]) for p in per)
    matched = sum(round((p["exact_match"] or 0.0) * p["generated"]) for p in per)
    scored = questions + generated
    return {
        "score": (correct + matched) / scored if scored else None,
        "acc": correct / questions if questions else None,
        "acc_norm": correct_norm / questions if questions else None,
        "exact_match": matched / generated if generated else None,
        "questions": questions,
        "generated": generated,
        "skipped": sum(p["skipped"] for p in per),
    }


def _points(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else (a - b) * 100.0


def seed_accuracy(
    combo: Sequence[str], evals: dict[str, dict], methods: Sequence[str]
) -> dict | None:
    """One seed's accuracy of one combination: the merged-data adapter, the base model, each
    domain under its own single adapter, and each method with its Δ accuracy (points) vs the
    merged-data adapter. None where the study has no accuracy units for it."""
    acc = names.accuracy_name
    if acc(names.merged_name(combo)) not in evals:
        return None
    merged_result = evals[acc(names.merged_name(combo))]
    merged = pooled(merged_result, combo)
    singles = [pooled(evals[acc(names.single_eval_name(d))], [d]) for d in combo]
    out = {
        "merged": merged,
        "base": pooled(evals[acc(names.BASE)], combo),
        "singles": _sum_pooled(singles),
        "skipped_domains": [
            d for d in combo if domain_rows(merged_result)[d]["scored_by"] == "skip"
        ],
        "methods": {},
    }
    for m in methods:
        v = pooled(evals[acc(names.composition_name(m, combo))], combo)
        out["methods"][m] = {**v, **{d: _points(v[k], merged[k]) for k, d in DELTAS.items()}}
    return out


def _sum_pooled(parts: list[dict]) -> dict:
    """`pooled` numbers of disjoint domain sets added up (each domain under its own adapter)."""
    questions = sum(p["questions"] for p in parts)
    generated = sum(p["generated"] for p in parts)

    def count(key: str, n: str) -> int:
        return sum(round((p[key] or 0.0) * p[n]) for p in parts)

    scored = questions + generated
    right = count("acc", "questions") + count("exact_match", "generated")
    return {
        "score": right / scored if scored else None,
        "acc": count("acc", "questions") / questions if questions else None,
        "acc_norm": count("acc_norm", "questions") / questions if questions else None,
        "exact_match": count("exact_match", "generated") / generated if generated else None,
        "questions": questions,
        "generated": generated,
        "skipped": sum(p["skipped"] for p in parts),
    }


def _mean(values: list) -> float | None:
    return None if not values or any(v is None for v in values) else sum(values) / len(values)


def _means(per_seed: list[dict]) -> dict:
    """Means over seeds of pooled numbers (counts from the first seed: the rows are fixed)."""
    out = {k: _mean([p[k] for p in per_seed]) for k in ("score", "acc", "acc_norm", "exact_match")}
    out.update({k: per_seed[0][k] for k in ("questions", "generated", "skipped")})
    return out


def add_accuracy(row: dict, per_seed: list[dict | None]) -> None:
    """Put one combination's accuracy (`seed_accuracy` per seed, in the row's seed order) into
    its aggregated ``row``: ``row["accuracy"]`` (merged, base, singles, skipped domains, best
    method by Δ accuracy), ``row["methods"][m]["accuracy"]`` (means, Δ accuracy with a 95 %
    t-interval over seeds) and each ``row["per_seed"]`` entry's (``delta_acc_pts``: the sum's
    Δ accuracy, the target `loo_prediction` reads)."""
    from lorasum.study.results import ci95

    if any(s is None for s in per_seed):
        return
    row["accuracy"] = {
        "merged": _means([s["merged"] for s in per_seed]),
        "base": _means([s["base"] for s in per_seed]),
        "singles": _means([s["singles"] for s in per_seed]),
        "skipped_domains": per_seed[0]["skipped_domains"],  # no row has options or a short answer
    }
    for m, method in row["methods"].items():
        per = [s["methods"][m] for s in per_seed]
        acc = _means(per)
        for key in DELTAS.values():
            acc[key] = _mean([p[key] for p in per])
        deltas = [p["delta_pts"] for p in per]
        acc["ci95"] = None if any(d is None for d in deltas) else ci95(deltas)
        method["accuracy"] = acc
    scored = {m: v["accuracy"]["delta_pts"] for m, v in row["methods"].items()}
    scored = {m: d for m, d in scored.items() if d is not None}
    top = max(scored.values()) if scored else None
    # ties are common on small test sets: every method at the top is best by accuracy
    row["accuracy"]["best_methods"] = [m for m, d in scored.items() if d == top]
    for s, seed_row in zip(per_seed, row["per_seed"], strict=True):
        seed_row["accuracy"] = {
            "merged": s["merged"],
            "methods": {
                m: {k: v[k] for k in ("score", *DELTAS.values())} for m, v in s["methods"].items()
            },
        }
        seed_row["delta_acc_pts"] = s["methods"]["sum"]["delta_pts"]
        for m, v in seed_row["methods"].items():
            v["delta_acc_pts"] = s["methods"][m]["delta_pts"]


def domain_rows(result: dict) -> dict[str, dict]:
    """Per domain of an accuracy result: how its rows are scored and how many."""
    out = {}
    for d, p in result["per_dataset"].items():
        kind = "choice" if p["questions"] else ("match" if p["generated"] else "skip")
        if p["questions"] and p["generated"]:
            kind = "choice+match"
        out[d] = {
            "scored_by": kind,
            "questions": p["questions"],
            "generated": p["generated"],
            "skipped": p["skipped"],
        }
    return out


def study_accuracy(rows: list[dict], base_result: dict, max_new_tokens: int) -> dict:
    """Study-wide: how each domain is scored (skipped ones listed), Spearman ρ of Δ% and Δ
    accuracy across (combination, method) rows (means over seeds), and the combinations whose
    best method by perplexity is not among the best by accuracy."""
    from lorasum.analysis.statistics import pearson_spearman

    domains = domain_rows(base_result)
    points = [
        (names.combo_name(r["domains"]), m, v["delta_pct"], v["accuracy"]["delta_pts"])
        for r in rows
        if "accuracy" in r
        for m, v in r["methods"].items()
        if v["accuracy"]["delta_pts"] is not None
    ]
    corr = pearson_spearman([p[2] for p in points], [p[3] for p in points])
    changes = []
    for r in rows:
        if "accuracy" not in r or not r["accuracy"]["best_methods"]:
            continue
        by_acc = r["accuracy"]["best_methods"]
        changes.append(
            {
                "combination": names.combo_name(r["domains"]),
                "domains": list(r["domains"]),
                "best_by_perplexity": r["best_method"],
                "best_by_accuracy": by_acc,
                "differs": r["best_method"] not in by_acc,
            }
        )
    return {
        "metrics": ["perplexity", "accuracy"],
        "max_new_tokens": max_new_tokens,
        "domains": domains,
        "skipped_domains": [d for d, v in domains.items() if v["scored_by"] == "skip"],
        "rank_correlation": {
            "n": corr["n"],
            "spearman_rho": corr["spearman_rho"],
            "spearman_p": corr["spearman_p"],
            "points": [
                {"combination": c, "method": m, "delta_pct": x, "delta_pts": y}
                for c, m, x, y in points
            ],
        },
        "best_method": changes,
        "rank_changes": [c["combination"] for c in changes if c["differs"]],
    }
