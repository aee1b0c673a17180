"""Correlation statistics against scipy and independent oracles: Pearson/Spearman, the grouped
bootstrap, the least-squares line and its confidence band."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from lorasum.analysis.statistics import (
    bootstrap_correlation,
    confidence_band,
    correlation,
    linear_fit,
    pearson_spearman,
)

# A known sample: Δ% against RMS cosine for 4 combinations × 3 seeds (made up, noisy, positive).
COMBOS = ["math+medicine", "math+finance", "medicine+finance", "math+medicine+finance"]
X = [0.276, 0.281, 0.270, 0.102, 0.110, 0.097, 0.095, 0.090, 0.101, 0.178, 0.181, 0.170]
Y = [10.9, 9.8, 11.6, 2.1, 3.0, 1.4, 1.9, 2.6, 0.9, 5.1, 4.2, 6.0]
G = [c for c in COMBOS for _ in range(3)]


# ---------------------------------------------------------------------------------------------
# Pearson and Spearman


def test_pearson_spearman_match_scipy():
    out = pearson_spearman(X, Y)
    p, s = stats.pearsonr(X, Y), stats.spearmanr(X, Y)
    assert out["n"] == 12
    assert out["pearson_r"] == pytest.approx(p.statistic, abs=1e-12)
    assert out["pearson_p"] == pytest.approx(p.pvalue, rel=1e-9)
    assert out["spearman_rho"] == pytest.approx(s.statistic, abs=1e-12)
    assert out["spearman_p"] == pytest.approx(s.pvalue, rel=1e-9)
    assert all(type(v) in (int, float) for v in out.values())


def test_monotone_but_curved_relation():
    x = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    out = pearson_spearman(x, [math.exp(v) for v in x])
    assert out["spearman_rho"] == pytest.approx(1.0)
    assert 0.8 < out["pearson_r"] < 0.99


@pytest.mark.parametrize(
    ("x", "y"),
    [
        ([], []),
        ([1.0, 2.0], [3.0, 5.0]),  # two points: r = ±1 always, not a measurement
        ([1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 3.0, 4.0]),  # constant x
        ([1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0]),  # constant y
        ([1.0, 2.0, float("nan"), 4.0], [1.0, 2.0, 3.0, float("inf")]),  # 2 finite pairs
    ],
)
def test_undefined_correlations_are_none(x, y):
    out = pearson_spearman(x, y)
    assert out["pearson_r"] is out["pearson_p"] is out["spearman_rho"] is out["spearman_p"] is None
    boot = bootstrap_correlation(x, y, n_resamples=50)
    assert boot["pearson_low"] is boot["pearson_high"] is boot["spearman_low"] is None


def test_non_finite_pairs_dropped():
    out = pearson_spearman([*X, float("nan")], [*Y, 1.0])
    assert out == pearson_spearman(X, Y)


# ---------------------------------------------------------------------------------------------
# Bootstrap


def _oracle(x, y, groups, n_resamples, seed, confidence=0.95):
    """The documented procedure, point by point with scipy's own functions."""
    labels = list(dict.fromkeys(groups))
    members = [[i for i, g in enumerate(groups) if g == label] for label in labels]
    picks = np.random.default_rng(seed).integers(0, len(labels), size=(n_resamples, len(labels)))
    rs, rhos, skipped = [], [], 0
    for row in picks:
        idx = [i for g in row for i in members[g]]
        bx, by = np.asarray(x)[idx], np.asarray(y)[idx]
        if len(set(bx)) == 1 or len(set(by)) == 1:
            skipped += 1
            continue
        rs.append(stats.pearsonr(bx, by).statistic)
        rhos.append(stats.spearmanr(bx, by).statistic)
    tail = (1 - confidence) / 2
    return skipped, np.quantile(rs, [tail, 1 - tail]), np.quantile(rhos, [tail, 1 - tail])


@pytest.mark.parametrize("grouped", [True, False])
def test_bootstrap_matches_oracle(grouped):
    groups = G if grouped else None
    out = bootstrap_correlation(X, Y, groups, n_resamples=400, seed=3)
    skipped, r_ci, rho_ci = _oracle(X, Y, G if grouped else list(range(12)), 400, 3)
    assert out["n_skipped"] == skipped and out["n_used"] == 400 - skipped
    assert [out["pearson_low"], out["pearson_high"]] == pytest.approx(r_ci, abs=1e-12)
    assert [out["spearman_low"], out["spearman_high"]] == pytest.approx(rho_ci, abs=1e-12)
    assert out["n_groups"] == (4 if grouped else 12) and out["n"] == 12


def test_bootstrap_unequal_group_sizes_match_oracle():
    rng = np.random.default_rng(0)
    groups = ["a", "a", "a", "b", "c", "c", "d", "d", "d", "d", "e"]
    x = rng.normal(size=11)
    y = x + rng.normal(scale=0.8, size=11)
    out = bootstrap_correlation(x.tolist(), y.tolist(), groups, n_resamples=300, seed=1)
    skipped, r_ci, rho_ci = _oracle(x, y, groups, 300, 1)
    assert out["n_skipped"] == skipped
    assert [out["pearson_low"], out["pearson_high"]] == pytest.approx(r_ci, abs=1e-12)
    assert [out["spearman_low"], out["spearman_high"]] == pytest.approx(rho_ci, abs=1e-12)


def test_bootstrap_reproducible_and_brackets_estimate():
    a = bootstrap_correlation(X, Y, G, n_resamples=2000, seed=7)
    assert a == bootstrap_correlation(X, Y, G, n_resamples=2000, seed=7)
    b = bootstrap_correlation(X, Y, G, n_resamples=2000, seed=8)
    assert (a["pearson_low"], a["spearman_low"]) != (b["pearson_low"], b["spearman_low"])
    point = pearson_spearman(X, Y)
    assert a["pearson_r"] == point["pearson_r"] and a["spearman_rho"] == point["spearman_rho"]
    assert -1 <= a["pearson_low"] <= a["pearson_r"] <= a["pearson_high"] <= 1
    assert -1 <= a["spearman_low"] <= a["spearman_rho"] <= a["spearman_high"] <= 1
    assert a["n_resamples"] == a["n_used"] + a["n_skipped"] == 2000
    assert a["seed"] == 7 and a["confidence"] == 0.95
    narrow = bootstrap_correlation(X, Y, G, n_resamples=2000, seed=7, confidence=0.5)
    assert a["pearson_low"] <= narrow["pearson_low"] <= narrow["pearson_high"] <= a["pearson_high"]


def test_perfect_line_gives_r_one_and_a_degenerate_interval():
    x = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    y = [3.0 * v - 1.0 for v in x]
    out = bootstrap_correlation(x, y, ["a", "a", "b", "b", "c", "c"], n_resamples=500, seed=0)
    assert out["pearson_r"] == pytest.approx(1.0) and out["spearman_rho"] == pytest.approx(1.0)
    for key in ("pearson_low", "pearson_high", "spearman_low", "spearman_high"):
        assert out[key] == pytest.approx(1.0)
    assert out["n_skipped"] == 0  # every group spans two x values: no resample is constant


def test_groups_keep_their_seed_points_together():
    # Each combination holds the points (0, 0) and (1, 1). Drawn as groups, every resample
    # contains both points, so r = 1 and none is constant. Drawn point by point, some
    # resamples hold one of the two points only: constant, skipped.
    x = [0.0, 1.0] * 3
    y = [0.0, 1.0] * 3
    grouped = bootstrap_correlation(x, y, ["a", "a", "b", "b", "c", "c"], n_resamples=2000)
    ungrouped = bootstrap_correlation(x, y, None, n_resamples=2000)
    assert grouped["n_skipped"] == 0 and grouped["n_used"] == 2000
    assert grouped["pearson_low"] == pytest.approx(1.0)
    # P(constant) = 2 · (1/2)^6 = 1/32 per resample: ~62 of 2000
    assert 30 < ungrouped["n_skipped"] < 110


def test_grouped_interval_wider_when_seed_points_are_correlated():
    # 5 combinations, 6 seeds each, seeds scattered tightly around their combination: 30
    # points look like much more evidence than 5 combinations are.
    rng = np.random.default_rng(11)
    centres_x = np.array([0.1, 0.15, 0.2, 0.25, 0.3])
    centres_y = np.array([1.0, 3.5, 1.5, 4.0, 2.5])
    x = np.repeat(centres_x, 6) + rng.normal(scale=0.005, size=30)
    y = np.repeat(centres_y, 6) + rng.normal(scale=0.1, size=30)
    groups = np.repeat(np.arange(5), 6).tolist()
    g = bootstrap_correlation(x.tolist(), y.tolist(), groups, n_resamples=1000, seed=0)
    u = bootstrap_correlation(x.tolist(), y.tolist(), None, n_resamples=1000, seed=0)
    assert g["pearson_r"] == u["pearson_r"]
    width_g = g["pearson_high"] - g["pearson_low"]
    width_u = u["pearson_high"] - u["pearson_low"]
    assert width_g > 2 * width_u


def test_bootstrap_needs_three_groups_and_valid_arguments():
    out = bootstrap_correlation(X[:6], Y[:6], G[:6], n_resamples=100)  # 2 combinations
    assert out["n_groups"] == 2 and out["pearson_low"] is None and out["n_used"] == 0
    assert out["pearson_r"] is not None  # the point estimate over 6 points still exists
    with pytest.raises(ValueError, match="n_resamples"):
        bootstrap_correlation(X, Y, G, n_resamples=0)
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_correlation(X, Y, G, confidence=95)
    with pytest.raises(ValueError, match="one entry per point"):
        bootstrap_correlation(X, Y, G[:-1])


def test_groups_none_is_one_group_per_point():
    a = bootstrap_correlation(X, Y, None, n_resamples=300, seed=2)
    b = bootstrap_correlation(X, Y, list(range(12)), n_resamples=300, seed=2)
    assert a == b


# ---------------------------------------------------------------------------------------------
# Least squares and the confidence band


def test_linear_fit_matches_linregress():
    fit = linear_fit(X, Y)
    ref = stats.linregress(X, Y)
    assert fit["n"] == 12
    assert fit["slope"] == pytest.approx(ref.slope, rel=1e-12)
    assert fit["intercept"] == pytest.approx(ref.intercept, rel=1e-12)
    assert fit["slope_stderr"] == pytest.approx(ref.stderr, rel=1e-12)
    assert fit["intercept_stderr"] == pytest.approx(ref.intercept_stderr, rel=1e-12)
    # s, x̄ and Σ(x − x̄)² agree with the standard error linregress reports
    assert fit["slope_stderr"] == pytest.approx(fit["residual_std"] / math.sqrt(fit["x_ss"]))
    assert fit["x_mean"] == pytest.approx(np.mean(X))
    assert all(type(v) in (int, float) for v in fit.values())
    # the study's original summary is unchanged
    old = correlation(X, Y)
    assert set(old) == {"n", "pearson_r", "p_value", "slope", "intercept"}
    assert old["slope"] == pytest.approx(fit["slope"])


def test_linear_fit_undefined_parts():
    two = linear_fit([1.0, 2.0], [1.0, 3.0])
    assert two["slope"] == pytest.approx(2.0) and two["intercept"] == pytest.approx(-1.0)
    assert two["slope_stderr"] is two["intercept_stderr"] is two["residual_std"] is None
    flat = linear_fit([2.0, 2.0, 2.0], [1.0, 2.0, 3.0])
    assert flat["slope"] is None and flat["slope_stderr"] is None
    assert linear_fit([], [])["slope"] is None and linear_fit([], [])["x_mean"] is None
    band = confidence_band(two, [0.0, 1.0])
    assert band["y"] == pytest.approx([-1.0, 1.0]) and band["lower"] == [None, None]
    assert confidence_band(flat, [0.0])["y"] == [None]


def test_band_matches_design_matrix_oracle():
    fit = linear_fit(X, Y)
    grid = np.linspace(0.0, 0.4, 9)
    band = confidence_band(fit, grid.tolist())
    # Var(ŷ₀) = s² · x₀ᵀ (XᵀX)⁻¹ x₀ with the design matrix X = [1, x]
    design = np.column_stack([np.ones(len(X)), X])
    beta, *_ = np.linalg.lstsq(design, np.asarray(Y), rcond=None)
    resid = np.asarray(Y) - design @ beta
    s2 = resid @ resid / (len(X) - 2)
    x0 = np.column_stack([np.ones_like(grid), grid])
    se = np.sqrt(s2 * np.einsum("ij,jk,ik->i", x0, np.linalg.inv(design.T @ design), x0))
    t = stats.t.ppf(0.975, len(X) - 2)
    assert band["y"] == pytest.approx((x0 @ beta).tolist(), rel=1e-10)
    assert band["lower"] == pytest.approx((x0 @ beta - t * se).tolist(), rel=1e-9)
    assert band["upper"] == pytest.approx((x0 @ beta + t * se).tolist(), rel=1e-9)
    widths = np.subtract(band["upper"], band["lower"])
    assert np.argmin(np.abs(grid - fit["x_mean"])) == np.argmin(widths)  # narrowest at x̄


def test_band_of_perfect_line_has_zero_width():
    x = [0.0, 1.0, 2.0, 3.0]
    fit = linear_fit(x, [2.0 * v + 1.0 for v in x])
    assert fit["slope_stderr"] == pytest.approx(0.0, abs=1e-12)
    band = confidence_band(fit, [0.5, 5.0])
    assert band["lower"] == pytest.approx(band["upper"], abs=1e-9)
    assert band["y"] == pytest.approx([2.0, 11.0])


def test_band_covers_the_true_line_95_percent_of_the_time():
    rng = np.random.default_rng(5)
    x = np.linspace(0.0, 1.0, 8)
    x0 = [0.0, 0.5, 1.2]
    truth = 1.0 + 2.0 * np.asarray(x0)
    hits, trials = np.zeros(3), 1000
    for _ in range(trials):
        y = 1.0 + 2.0 * x + rng.normal(scale=0.5, size=x.size)
        band = confidence_band(linear_fit(x.tolist(), y.tolist()), x0)
        hits += (np.asarray(band["lower"]) <= truth) & (truth <= np.asarray(band["upper"]))
    # binomial sd at 1000 trials ≈ 0.0069: ±0.025 is 3.6 sd
    assert np.all(np.abs(hits / trials - 0.95) < 0.025), hits / trials
