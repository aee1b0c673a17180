"""Correlation of perplexity change with RMS cosine across combinations.

``correlation`` is the study's original summary (Pearson r and the least-squares line). For
studies with several seeds per combination: ``pearson_spearman`` (both coefficients with
p-values), ``bootstrap_correlation`` (percentile intervals that resample combinations with
their seed points), ``linear_fit`` (line with standard errors) and ``confidence_band`` (the
fitted line's 95 % band, for plots). All return plain dicts of floats, None where undefined.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import numpy as np


def correlation(x: Sequence[float], y: Sequence[float]) -> dict:
    """Pearson r (and its p-value) and the least-squares line y = slope·x + intercept.

    Fields are None where undefined: fewer than 2 points for the line, fewer than 3 for r
    (two points always give r = ±1), or x constant.
    """
    from scipy import stats

    n = len(x)
    out: dict = {"n": n, "pearson_r": None, "p_value": None, "slope": None, "intercept": None}
    pts = [(a, b) for a, b in zip(x, y, strict=True) if math.isfinite(a) and math.isfinite(b)]
    out["n"] = len(pts)
    if len(pts) < 2:
        return out
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    if max(xs) - min(xs) == 0:
        return out
    fit = stats.linregress(xs, ys)
    out["slope"], out["intercept"] = float(fit.slope), float(fit.intercept)
    if len(pts) >= 3 and max(ys) - min(ys) > 0:
        r = stats.pearsonr(xs, ys)
        out["pearson_r"], out["p_value"] = float(r.statistic), float(r.pvalue)
    return out


def delta_pct(ppl_sum: float, ppl_merged: float) -> float:
    """Δ% = (ppl_sum − ppl_merged) / ppl_merged · 100 (negative: the sum is better)."""
    return (ppl_sum - ppl_merged) / ppl_merged * 100.0


# ---------------------------------------------------------------------------------------------
# Correlation with intervals, for studies with several seed points per combination
#
# Every function takes paired sequences x, y (e.g. RMS cosine and Δ% per (combination, seed)),
# drops pairs with a non-finite value, and returns a plain dict of floats, with None wherever
# the quantity is undefined (too few points, constant x or y).


def _finite(
    x: Sequence[float], y: Sequence[float], groups: Sequence[Hashable] | None = None
) -> tuple[np.ndarray, np.ndarray, list[Hashable]]:
    """(x, y, group labels) of the pairs where both values are finite; group labels default
    to one group per point."""
    labels = list(range(len(x))) if groups is None else list(groups)
    if not len(x) == len(y) == len(labels):
        raise ValueError(
            f"x, y and groups must have one entry per point (got {len(x)}, {len(y)}, {len(labels)})"
        )
    keep = [i for i in range(len(x)) if math.isfinite(x[i]) and math.isfinite(y[i])]
    xs = np.array([float(x[i]) for i in keep], dtype=np.float64)
    ys = np.array([float(y[i]) for i in keep], dtype=np.float64)
    return xs, ys, [labels[i] for i in keep]


def _varies(v: np.ndarray) -> bool:
    return v.size > 0 and float(np.ptp(v)) > 0.0


def pearson_spearman(x: Sequence[float], y: Sequence[float]) -> dict:
    """Pearson r and Spearman ρ of y on x with their two-sided p-values (scipy.stats).

    Returns ``{"n", "pearson_r", "pearson_p", "spearman_rho", "spearman_p"}``: ``n`` is the
    number of finite pairs; the rest are None for n < 3 or constant x or y. The p-values assume
    independent points: with several seed points per combination they are optimistic, use
    ``bootstrap_correlation`` with groups for an interval.
    """
    from scipy import stats

    xs, ys, _ = _finite(x, y)
    out: dict = {
        "n": int(xs.size),
        "pearson_r": None,
        "pearson_p": None,
        "spearman_rho": None,
        "spearman_p": None,
    }
    if xs.size < 3 or not _varies(xs) or not _varies(ys):
        return out
    pearson = stats.pearsonr(xs, ys)
    spearman = stats.spearmanr(xs, ys)
    out["pearson_r"], out["pearson_p"] = float(pearson.statistic), float(pearson.pvalue)
    out["spearman_rho"], out["spearman_p"] = float(spearman.statistic), float(spearman.pvalue)
    return out


def _group_members(labels: Sequence[Hashable]) -> list[np.ndarray]:
    """Point indices of each group, groups in order of first appearance."""
    order: dict[Hashable, list[int]] = {}
    for i, label in enumerate(labels):
        order.setdefault(label, []).append(i)
    return [np.array(v, dtype=np.int64) for v in order.values()]  # point indices per group


def _resampled_correlations(
    xs: np.ndarray, ys: np.ndarray, members: list[np.ndarray], n_resamples: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(r, ρ) of each group resample, each (R,); NaN where x or y is constant."""
    from scipy import stats

    n_groups = len(members)
    picks = np.random.default_rng(seed).integers(0, n_groups, size=(n_resamples, n_groups))
    sizes = np.array([m.size for m in members])
    lengths = sizes[picks].sum(axis=1)  # (R,) points per resample
    r = np.full(n_resamples, np.nan)
    rho = np.full(n_resamples, np.nan)
    for length in np.unique(lengths):  # resamples of one length are stacked and done at once
        rows = np.flatnonzero(lengths == length)
        idx = np.stack([np.concatenate([members[g] for g in picks[i]]) for i in rows])  # (m, L)
        bx, by = xs[idx], ys[idx]
        ok = (np.ptp(bx, axis=1) > 0) & (np.ptp(by, axis=1) > 0)
        if not ok.any():
            continue
        bx, by, rows = bx[ok], by[ok], rows[ok]
        r[rows] = stats.pearsonr(bx, by, axis=1).statistic
        rx, ry = stats.rankdata(bx, axis=1), stats.rankdata(by, axis=1)
        rho[rows] = stats.pearsonr(rx, ry, axis=1).statistic
    return r, rho


def bootstrap_correlation(
    x: Sequence[float],
    y: Sequence[float],
    groups: Sequence[Hashable] | None = None,
    n_resamples: int = 10_000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict:
    """Percentile bootstrap interval of Pearson r and Spearman ρ, resampling whole groups.

    ``groups[i]`` names the group of point i (e.g. its combination, when each combination has
    one point per training seed). Each resample draws as many groups as there are, uniformly
    with replacement, and keeps *all* points of every drawn group (a group drawn twice counts
    twice), so seed points of one combination are never split up. ``groups=None`` makes every
    point its own group (the ordinary bootstrap).

    The draws are ``numpy.random.default_rng(seed).integers(0, G, size=(n_resamples, G))``,
    groups numbered in order of first appearance: the same inputs and seed give the same
    interval. A resample with constant x or constant y has no correlation: it is skipped and
    counted in ``n_skipped``; the interval is the (1 ± confidence)/2 quantiles of the others.
    Per resample, r is ``scipy.stats.pearsonr`` and ρ is Pearson's r of the average ranks
    (``scipy.stats.rankdata``), which is how ``scipy.stats.spearmanr`` defines it.

    Returns ``{"n", "n_groups", "n_resamples", "n_used", "n_skipped", "seed", "confidence",
    "pearson_r", "pearson_low", "pearson_high", "spearman_rho", "spearman_low",
    "spearman_high"}``: the point estimates are those of ``pearson_spearman`` on all points;
    the intervals are None with fewer than 3 groups or when every resample was skipped.
    """
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be at least 1, got {n_resamples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    xs, ys, labels = _finite(x, y, groups)
    point = pearson_spearman(xs.tolist(), ys.tolist())
    members = _group_members(labels)
    n_groups = len(members)
    out: dict = {
        "n": int(xs.size),
        "n_groups": n_groups,
        "n_resamples": int(n_resamples),
        "n_used": 0,
        "n_skipped": 0,
        "seed": int(seed),
        "confidence": float(confidence),
        "pearson_r": point["pearson_r"],
        "pearson_low": None,
        "pearson_high": None,
        "spearman_rho": point["spearman_rho"],
        "spearman_low": None,
        "spearman_high": None,
    }
    if n_groups < 3:
        return out

    r, rho = _resampled_correlations(xs, ys, members, n_resamples, seed)
    used = ~np.isnan(r)
    out["n_used"] = int(used.sum())
    out["n_skipped"] = int(n_resamples - used.sum())
    if out["n_used"] == 0:
        return out
    tail = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(r[used], [tail, 1.0 - tail])
    out["pearson_low"], out["pearson_high"] = float(lo), float(hi)
    lo, hi = np.quantile(rho[used], [tail, 1.0 - tail])
    out["spearman_low"], out["spearman_high"] = float(lo), float(hi)
    return out


def linear_fit(x: Sequence[float], y: Sequence[float]) -> dict:
    """Least-squares line y = slope·x + intercept (``scipy.stats.linregress``) with standard
    errors, and what ``confidence_band`` needs.

    Returns ``{"n", "slope", "intercept", "slope_stderr", "intercept_stderr", "residual_std",
    "x_mean", "x_ss"}``: ``residual_std`` is s = √(Σ residual² / (n − 2)), ``x_ss`` is
    Σ (x − x̄)². The line needs n ≥ 2 and x not constant; the standard errors and s need n ≥ 3
    (two points fit exactly, with no error to estimate). Undefined fields are None.
    """
    from scipy import stats

    xs, ys, _ = _finite(x, y)
    n = int(xs.size)
    out: dict = {
        "n": n,
        "slope": None,
        "intercept": None,
        "slope_stderr": None,
        "intercept_stderr": None,
        "residual_std": None,
        "x_mean": float(xs.mean()) if n else None,
        "x_ss": float(((xs - xs.mean()) ** 2).sum()) if n else None,
    }
    if n < 2 or not _varies(xs):
        return out
    fit = stats.linregress(xs, ys)
    out["slope"], out["intercept"] = float(fit.slope), float(fit.intercept)
    if n >= 3:
        residuals = ys - (fit.intercept + fit.slope * xs)
        out["slope_stderr"] = float(fit.stderr)
        out["intercept_stderr"] = float(fit.intercept_stderr)
        out["residual_std"] = float(np.sqrt((residuals**2).sum() / (n - 2)))
    return out


def confidence_band(fit: dict, x: Sequence[float], confidence: float = 0.95) -> dict:
    """Confidence band of the mean response of a ``linear_fit`` at the given x (for plotting).

    At x₀ the fitted mean ŷ₀ = intercept + slope·x₀ has the interval
    ŷ₀ ± t_{(1+confidence)/2, n−2} · s · √(1/n + (x₀ − x̄)² / Σ(x − x̄)²)  (the band of the
    line itself, not of new observations). Returns ``{"x", "y", "lower", "upper",
    "confidence"}`` as lists of floats; ``lower``/``upper`` are lists of None when the fit has
    no standard error (n < 3 or constant x), and ``y`` too when it has no line.
    """
    from scipy import stats

    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    x0 = np.asarray(x, dtype=np.float64)
    out: dict = {
        "x": x0.tolist(),
        "y": [None] * x0.size,
        "lower": [None] * x0.size,
        "upper": [None] * x0.size,
        "confidence": float(confidence),
    }
    if fit.get("slope") is None:
        return out
    y0 = fit["intercept"] + fit["slope"] * x0
    out["y"] = y0.tolist()
    if fit.get("residual_std") is None:
        return out
    n = fit["n"]
    t = float(stats.t.ppf(0.5 + confidence / 2.0, n - 2))
    half = t * fit["residual_std"] * np.sqrt(1.0 / n + (x0 - fit["x_mean"]) ** 2 / fit["x_ss"])
    out["lower"], out["upper"] = (y0 - half).tolist(), (y0 + half).tolist()
    return out
