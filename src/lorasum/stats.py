"""Correlation of perplexity change with RMS cosine across combinations."""

from __future__ import annotations

import math
from collections.abc import Sequence


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
