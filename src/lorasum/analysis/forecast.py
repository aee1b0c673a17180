"""Δ% forecast from finished studies: points, leave-one-combination-out fits, prediction intervals.

A finished study (``results.json`` of `lorasum reproduce`) holds, per combination and seed,
the measured Δ% of the sum against merged-data training and the interference predictors of
its adapters and data (`lorasum.analysis.predictors`). This module turns those rows into
points (x = a predictor, y = Δ%), fits y on x by least squares, and answers two questions:

- **how well does a predictor rank unseen combinations?** ``loo_predictions`` refits the line
  without every point of one combination (all its seeds: its *group*) and predicts that
  combination's points; ``loo_summary`` gives Pearson and Spearman of predicted vs measured;
- **what would ranking the combinations correctly score, given the seeds' spread?**
  ``oracle_rho``: the Spearman of every point's measured value against its own combination's
  mean — what a predictor that knew each combination's mean Δ% exactly, but nothing of a
  seed's luck (the merged-data adapter's training noise above all), would reach. A LOO ρ far
  below it is the predictor's shortfall, not noise;
- **what Δ% should a new set of adapters expect?** ``forecast`` evaluates the line fitted on
  every point at the new predictor value, with the 95 % prediction interval of a new
  observation, ŷ₀ ± t_{0.975, n−2} · s · √(1 + 1/n + (x₀ − x̄)² / Sxx).

Points of one combination in two studies are separate groups (the study index is part of the
group label): two studies are two draws of that combination under different settings.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from pathlib import Path

import numpy as np

from lorasum.analysis.predictors import predictor_names
from lorasum.analysis.statistics import linear_fit, pearson_spearman
from lorasum.data.sources import combo_name
from lorasum.errors import LorasumError


def _line(x: np.ndarray, y: np.ndarray) -> tuple[float, float] | None:
    """Least-squares (slope, intercept) of y on x; None for < 2 points or constant x."""
    if x.size < 2:
        return None
    xm = x.mean()
    sxx = float(((x - xm) ** 2).sum())
    if sxx <= 0.0 or not math.isfinite(sxx):
        return None
    slope = float(((x - xm) * (y - y.mean())).sum()) / sxx
    return slope, float(y.mean()) - slope * float(xm)


def loo_predictions(
    x: Sequence[float], y: Sequence[float], groups: Sequence[Hashable]
) -> list[float | None]:
    """Leave-one-group-out predictions of y from x.

    For each point i: the least-squares line of y on x fitted on every point whose group
    differs from ``groups[i]``, evaluated at ``x[i]``; None when that leaves fewer than 2
    points or a constant x.
    """
    if not len(x) == len(y) == len(groups):
        raise ValueError(
            f"x, y and groups need one entry per point (got {len(x)}, {len(y)}, {len(groups)})"
        )
    xs = np.asarray(x, dtype=np.float64)
    ys = np.asarray(y, dtype=np.float64)
    labels = list(groups)
    fits: dict[Hashable, tuple[float, float] | None] = {}
    out: list[float | None] = []
    for i, label in enumerate(labels):
        if label not in fits:
            keep = np.array([g != label for g in labels], dtype=bool)
            fits[label] = _line(xs[keep], ys[keep])
        line = fits[label]
        out.append(None if line is None else line[0] * float(xs[i]) + line[1])
    return out


def oracle_rho(y: Sequence[float], groups: Sequence[Hashable]) -> float | None:
    """Spearman of y against each point's group mean of y (None for < 3 points or one group).

    What a predictor that knows every combination's mean Δ% exactly — it ranks the
    combinations correctly — but nothing of a seed's deviation from it reaches over the
    points (under leave-one-combination-out too: the line of y on group means is y = x).
    Measured in-sample: a reference to read a leave-one-out ρ against, not a score and not a
    strict bound (ties between predictions can score a little higher).
    """
    if len(y) != len(groups):
        raise ValueError(f"y and groups need one entry per point (got {len(y)}, {len(groups)})")
    labels = list(groups)
    if len(labels) < 3 or len(set(labels)) < 2:
        return None
    ys = np.asarray(y, dtype=np.float64)
    means = {g: float(ys[[lab == g for lab in labels]].mean()) for g in set(labels)}
    return pearson_spearman([means[g] for g in labels], ys.tolist())["spearman_rho"]


def loo_summary(x: Sequence[float], y: Sequence[float], groups: Sequence[Hashable]) -> dict:
    """Leave-one-group-out predictions and how they compare with the measured values.

    Returns ``{"predicted", "n", "pearson_r", "spearman_rho", "mae", "oracle_rho"}``:
    correlations of predicted vs measured over the points that have a prediction (None for
    fewer than 3 or a constant side), their mean absolute error, and `oracle_rho` over
    the same points.
    """
    predicted = loo_predictions(x, y, groups)
    pts = [(p, t) for p, t in zip(predicted, y, strict=True) if p is not None]
    corr = pearson_spearman([p for p, _ in pts], [t for _, t in pts])
    return {
        "predicted": predicted,
        "n": len(pts),
        "pearson_r": corr["pearson_r"],
        "spearman_rho": corr["spearman_rho"],
        "mae": sum(abs(p - t) for p, t in pts) / len(pts) if pts else None,
        "oracle_rho": oracle_rho(
            [t for (p, t) in zip(predicted, y, strict=True) if p is not None],
            [g for (p, g) in zip(predicted, groups, strict=True) if p is not None],
        ),
    }


# --- a study's rows: leave-one-combination-out per predictor (results.json "prediction") --------


def predictor_points(
    rows: list[dict], predictor: str, target: str = "delta_pct"
) -> tuple[list[float], list[float], list]:
    """(x, y, group) over every (combination, seed) of a study's aggregated ``rows`` (results.json
    ``combinations``, each with ``per_seed``) that has the predictor and the target."""
    xs, ys, groups = [], [], []
    for row in rows:
        for s in row["per_seed"]:
            x = s.get("predictors", {}).get(predictor)
            if x is None or s.get(target) is None:
                continue
            xs.append(float(x))
            ys.append(float(s[target]))
            groups.append(combo_name(row["domains"]))
    return xs, ys, groups


def loo_prediction(rows: list[dict], target: str = "delta_pct") -> dict:
    """Leave-one-combination-out: each point's ``target`` (Δ% vs merged-data training, or
    ``delta_vs_singles_pct``: the sum vs each domain's own adapter) predicted by the line fitted
    on the other combinations; Pearson and Spearman of predicted vs measured, per predictor, and
    ``oracle_rho`` (`oracle_rho`): the Spearman that predicting each point by its
    combination's mean measured value would reach — what the seeds' spread leaves."""
    out = {}
    for predictor in rows[0]["predictors"] if rows else []:
        xs, ys, groups = predictor_points(rows, predictor, target)
        predicted = loo_predictions(xs, ys, groups)
        points = [
            {"combination": g, "x": x, "predicted": p, "measured": y}
            for x, y, g, p in zip(xs, ys, groups, predicted, strict=True)
        ]
        seeds = [
            s["seed"]
            for r in rows
            for s in r["per_seed"]
            if s.get("predictors", {}).get(predictor) is not None and s.get(target) is not None
        ]
        for point, seed in zip(points, seeds, strict=True):
            point["seed"] = seed
        ok = [p for p in points if p["predicted"] is not None]
        corr = pearson_spearman([p["predicted"] for p in ok], [p["measured"] for p in ok])
        out[predictor] = {
            "points": points,
            "n": len(ok),
            "pearson_r": corr["pearson_r"],
            "spearman_rho": corr["spearman_rho"],
            "mean_abs_error": (
                sum(abs(p["predicted"] - p["measured"]) for p in ok) / len(ok) if ok else None
            ),
            # the ρ of a predictor that knows each combination's mean exactly
            "oracle_rho": oracle_rho([p["measured"] for p in ok], [p["combination"] for p in ok]),
        }
    return out


# --- points from studies ---------------------------------------------------------------------


def _value(row: dict, predictor: str) -> float | None:
    value = (row.get("predictors") or {}).get(predictor)
    if value is None and predictor == "rms_cosine":
        value = row.get("rms_cosine")
    if value is None or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _rows(combination: dict) -> list[dict]:
    """The per-seed rows of a combination (the combination itself for old one-seed results)."""
    return combination.get("per_seed") or [combination]


def fit_points(
    study_results: Sequence[dict], predictor: str, target: str = "delta_pct"
) -> tuple[list[float], list[float], list[str]]:
    """(x, y, groups) from results.json dicts: one point per (combination, seed) row.

    x = ``row["predictors"][predictor]`` (for ``rms_cosine`` also ``row["rms_cosine"]``, where
    older results keep it), y = ``row[target]`` (Δ% vs merged-data training, or
    ``delta_vs_singles_pct``: the sum vs each domain's own adapter, where the study recorded
    it), group = ``"<study index>:a+b"``. Rows without a finite x or y are skipped.
    """
    x: list[float] = []
    y: list[float] = []
    groups: list[str] = []
    for k, results in enumerate(study_results):
        for combination in results.get("combinations") or []:
            label = f"{k}:" + "+".join(combination.get("domains") or [])
            for row in _rows(combination):
                value, delta = _value(row, predictor), row.get(target)
                if value is None or not isinstance(delta, int | float) or not math.isfinite(delta):
                    continue
                x.append(value)
                y.append(float(delta))
                groups.append(label)
    return x, y, groups


def read_studies(dirs: Sequence[str | Path]) -> list[dict]:
    """Every study directory's results.json (as the current schema's dict: older versions
    migrated, a newer one refused), one line for a missing or unreadable one."""
    from lorasum.io import read_json
    from lorasum.results_schema import upgrade

    out = []
    for d in dirs:
        path = Path(d) / "results.json"
        if not path.is_file():
            raise LorasumError(
                f"{d} has no results.json; pass the directory of a finished `lorasum reproduce`"
            )
        try:
            results = read_json(path)
        except (OSError, ValueError) as e:
            raise LorasumError(f"cannot read {path} ({str(e)[:80]}); rerun that study") from None
        if not isinstance(results, dict) or not isinstance(results.get("combinations"), list):
            raise LorasumError(f"{path} is not the results of a `lorasum reproduce` study")
        out.append(upgrade(results, str(path)))
    return out


def available_predictors(study_results: Sequence[dict]) -> list[str]:
    """Predictor names with at least one point in the studies (known ones first)."""
    names: dict[str, None] = {}
    for results in study_results:
        for combination in results.get("combinations") or []:
            for row in _rows(combination):
                for name in row.get("predictors") or {}:
                    names[name] = None
                if row.get("rms_cosine") is not None:
                    names["rms_cosine"] = None
    order = predictor_names()  # the registry's order
    known = [p for p in order if p in names]
    return known + sorted(n for n in names if n not in order)


def rank_predictors(
    study_results: Sequence[dict], names: Sequence[str] | None = None, target: str = "delta_pct"
) -> dict:
    """Leave-one-combination-out Spearman and Pearson of each predictor over the studies
    (``target``: as in `fit_points`). Returns name -> {"n", "spearman_rho", "pearson_r", "mae",
    "oracle_rho"}.
    """
    out = {}
    for name in names or available_predictors(study_results):
        x, y, groups = fit_points(study_results, name, target)
        s = loo_summary(x, y, groups)
        out[name] = {k: s[k] for k in ("n", "spearman_rho", "pearson_r", "mae", "oracle_rho")}
    return out


def best_predictor(ranking: dict, usable: Sequence[str] | None = None) -> str | None:
    """The predictor with the highest leave-one-out Spearman (ties: Pearson), among ``usable``."""
    scored = [
        (v["spearman_rho"], v["pearson_r"] if v["pearson_r"] is not None else -2.0, name)
        for name, v in ranking.items()
        if v["spearman_rho"] is not None and (usable is None or name in usable)
    ]
    return max(scored)[2] if scored else None


def prediction_interval(fit: dict, x0: float, confidence: float = 0.95) -> tuple[float, float]:
    """Interval for one new observation at x0 of a ``statistics.linear_fit`` with n ≥ 3."""
    from scipy import stats

    n = fit["n"]
    t = float(stats.t.ppf(0.5 + confidence / 2.0, n - 2))
    half = (
        t * fit["residual_std"] * math.sqrt(1.0 + 1.0 / n + (x0 - fit["x_mean"]) ** 2 / fit["x_ss"])
    )
    y0 = fit["intercept"] + fit["slope"] * x0
    return y0 - half, y0 + half


def forecast(
    study_results: Sequence[dict],
    predictor: str,
    x0: float,
    confidence: float = 0.95,
    target: str = "delta_pct",
) -> dict:
    """Predicted Δ% at predictor value x0 from every point of the studies, with an interval.

    Returns ``{"predictor", "x", "delta_pct", "low", "high", "confidence", "fit", "loo",
    "range"}`` (``range``: the predictor's min and max over the points: outside it the line is
    extrapolated; ``delta_pct`` is the predicted ``target``). One line (LorasumError) when the studies have fewer than 3 points with
    that predictor or a constant predictor.
    """
    x, y, groups = fit_points(study_results, predictor, target)
    if not x:
        have = ", ".join(available_predictors(study_results)) or "none"
        raise LorasumError(
            f"the studies have no points with predictor {predictor!r} (they have: {have}); "
            "choose another --predictor or rerun the studies"
        )
    if len(x) < 3:
        raise LorasumError(
            f"only {len(x)} points with predictor {predictor!r} in the studies; a fit with an "
            "interval needs at least 3 (pass more --fit studies or more seeds)"
        )
    fit = linear_fit(x, y)
    if fit["slope"] is None or fit["residual_std"] is None:
        raise LorasumError(
            f"predictor {predictor!r} takes one value on every study point; no line can be "
            "fitted (choose another --predictor)"
        )
    low, high = prediction_interval(fit, x0, confidence)
    summary = loo_summary(x, y, groups)
    return {
        "predictor": predictor,
        "x": float(x0),
        "delta_pct": fit["intercept"] + fit["slope"] * x0,
        "low": low,
        "high": high,
        "confidence": confidence,
        "fit": fit,
        "loo": {k: summary[k] for k in ("n", "spearman_rho", "pearson_r", "mae", "oracle_rho")},
        "range": [min(x), max(x)],
        "n_groups": len(set(groups)),
    }


def recommend_method(
    study_results: Sequence[dict],
    predictor: str | None = None,
    x0: float | None = None,
    nearest: int | None = None,
    exclude_categories: Sequence[str] = (),
) -> dict | None:
    """The method with the lowest mean Δ% over the studies' combinations.

    Reads ``combinations[i]["methods"][name]["delta_pct"]`` (the sum's own Δ% counts as
    ``sum`` where a study has no methods map). With ``predictor``, ``x0`` and ``nearest``,
    only the ``nearest`` combinations whose predictor value is closest to x0 count (the
    regime of the new adapters). Methods of ``exclude_categories`` (e.g. "calibrated", which
    needs validation data and a fit) are left out. A method must be measured on every
    counted combination.
    Returns ``{"method", "mean_delta_pct", "category", "n_combinations", "table"}`` (table:
    method -> mean Δ%) or None when the studies measured nothing.
    """
    rows = []  # (distance, {method: (delta, category)})
    for results in study_results:
        for combination in results.get("combinations") or []:
            methods = {
                name: (m.get("delta_pct"), m.get("category"))
                for name, m in (combination.get("methods") or {}).items()
                if isinstance(m, dict)
                and isinstance(m.get("delta_pct"), int | float)
                and m.get("category") not in exclude_categories
            }
            if "sum" not in methods and isinstance(combination.get("delta_pct"), int | float):
                methods["sum"] = (combination["delta_pct"], "data-free")
            if not methods:
                continue
            distance = 0.0
            if predictor is not None and x0 is not None:
                values = [_value(r, predictor) for r in _rows(combination)]
                values = [v for v in values if v is not None]
                distance = abs(sum(values) / len(values) - x0) if values else math.inf
            rows.append((distance, methods))
    if not rows:
        return None
    rows.sort(key=lambda r: r[0])
    if nearest is not None:
        rows = rows[: max(1, nearest)]
    names = set.intersection(*(set(m) for _, m in rows))
    if not names:
        return None
    table = {n: sum(m[n][0] for _, m in rows) / len(rows) for n in names}
    best = min(table, key=lambda n: (table[n], n))
    category = next((m[best][1] for _, m in rows if m[best][1]), None)
    return {
        "method": best,
        "mean_delta_pct": table[best],
        "category": category,
        "n_combinations": len(rows),
        "table": dict(sorted(table.items(), key=lambda kv: kv[1])),
    }
