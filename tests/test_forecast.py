"""Δ% forecast: leave-one-group-out fits against an explicit refit, points read from results
dicts (new and old layouts), prediction intervals and method recommendation."""

import math

import numpy as np
import pytest
from scipy import stats

from lorasum.analysis.forecast import (
    best_predictor,
    fit_points,
    forecast,
    loo_predictions,
    loo_summary,
    oracle_rho,
    rank_predictors,
    recommend_method,
)
from lorasum.errors import LorasumError


def _refit(x, y, keep):
    fit = stats.linregress(np.asarray(x)[keep], np.asarray(y)[keep])
    return fit.slope, fit.intercept


def test_loo_predictions_equal_an_explicit_refit():
    rng = np.random.default_rng(0)
    x = rng.normal(size=12).tolist()
    y = (2.0 * np.asarray(x) + rng.normal(size=12)).tolist()
    groups = [i // 3 for i in range(12)]  # 4 groups of 3 seed points
    predicted = loo_predictions(x, y, groups)
    for i in range(12):
        keep = np.array([g != groups[i] for g in groups])
        slope, intercept = _refit(x, y, keep)
        assert predicted[i] == pytest.approx(slope * x[i] + intercept, rel=1e-10, abs=1e-10)


def test_loo_predictions_none_when_too_few_or_constant():
    assert loo_predictions([1.0, 2.0], [1.0, 2.0], ["a", "b"]) == [None, None]
    # leaving group "a" out leaves a constant x
    assert loo_predictions([0.0, 1.0, 1.0], [0.0, 1.0, 2.0], ["a", "b", "c"])[0] is None
    with pytest.raises(ValueError):
        loo_predictions([1.0], [1.0, 2.0], ["a"])


def test_loo_summary_ranks_a_monotone_relation_perfectly():
    x = [0.1, 0.2, 0.3, 0.4, 0.5]
    y = [1.0 + 3.0 * v for v in x]
    s = loo_summary(x, y, ["a", "b", "c", "d", "e"])
    assert s["spearman_rho"] == pytest.approx(1.0)
    assert s["mae"] == pytest.approx(0.0, abs=1e-9)


def test_a_predictor_that_knows_each_combination_mean_scores_the_oracle_rho():
    """x = each combination's true mean Δ%: the leave-one-combination-out line is y = x, so its
    LOO predictions are the means and its LOO ρ is `oracle_rho`; any other predictor's LOO ρ is
    reported next to the same value."""
    rng = np.random.default_rng(3)
    for trial in range(10):
        n_groups, per = 4, 3
        y = np.repeat(rng.normal(size=n_groups), per) + 0.8 * rng.normal(size=n_groups * per)
        groups = [i // per for i in range(n_groups * per)]
        means = np.array([y[[g == h for h in groups]].mean() for g in groups])
        expected = stats.spearmanr(means, y).statistic
        knows = loo_summary(means.tolist(), y.tolist(), groups)
        assert np.allclose(knows["predicted"], means, atol=1e-9), trial
        assert knows["spearman_rho"] == pytest.approx(expected, abs=1e-12)
        assert oracle_rho(y.tolist(), groups) == pytest.approx(expected, abs=1e-12)
        other = loo_summary(rng.normal(size=y.size).tolist(), y.tolist(), groups)
        assert other["oracle_rho"] == pytest.approx(expected, abs=1e-12)


def test_oracle_rho_edges():
    # no spread within combinations: knowing the means ranks every point
    assert oracle_rho([1.0, 1.0, 5.0, 5.0, 3.0, 3.0], list("aabbcc")) == pytest.approx(1.0)
    # combinations with the same mean: knowing it ranks nothing
    assert oracle_rho([1.0, 2.0, 1.0, 2.0], list("aabb")) is None  # constant prediction
    assert oracle_rho([1.0, 2.0, 3.0], ["a", "a", "a"]) is None
    assert oracle_rho([1.0, 2.0], ["a", "b"]) is None
    with pytest.raises(ValueError):
        oracle_rho([1.0], ["a", "b"])


def _study(points, with_methods=False, old=False):
    """results dict: points = [(domains, [(x, y) per seed])]."""
    combinations = []
    for domains, seeds in points:
        rows = []
        for seed, (x, y) in enumerate(seeds):
            row = {"seed": seed, "delta_pct": y}
            if old:
                row["rms_cosine"] = x
            else:
                row["predictors"] = {"max_cross_talk": x, "rms_cosine": 10 * x}
            rows.append(row)
        combination = {
            "domains": domains,
            "delta_pct": sum(y for _, y in seeds) / len(seeds),
            "per_seed": rows,
        }
        if with_methods:
            combination["methods"] = {
                "sum": {"ppl": 1.0, "delta_pct": combination["delta_pct"], "category": "data-free"},
                "regmean": {"ppl": 1.0, "delta_pct": 5.0, "category": "calibration"},
            }
        combinations.append(combination)
    return {"combinations": combinations}


def test_fit_points_reads_new_and_old_layouts_and_separates_studies():
    new = _study([(["a", "b"], [(0.1, 1.0), (0.2, 2.0)]), (["a", "c"], [(0.3, 3.0)])])
    old = _study([(["a", "b"], [(0.5, 5.0)])], old=True)
    x, y, groups = fit_points([new, old], "rms_cosine")
    assert x == [1.0, 2.0, 3.0, 0.5] and y == [1.0, 2.0, 3.0, 5.0]
    assert groups == ["0:a+b", "0:a+b", "0:a+c", "1:a+b"]
    x, _, groups = fit_points([new, old], "max_cross_talk")  # the old study has none
    assert x == [0.1, 0.2, 0.3] and len(set(groups)) == 2


def test_forecast_recovers_a_known_line_and_its_interval_covers_the_truth():
    rng = np.random.default_rng(1)
    slope, intercept, noise = 40.0, -3.0, 0.2
    points = []
    for c in range(6):
        xs = rng.uniform(0.0, 0.5, size=3)
        points.append(
            ([f"d{c}", "e"], [(x, slope * x + intercept + noise * rng.normal()) for x in xs])
        )
    study = _study(points)
    out = forecast([study], "max_cross_talk", 0.25)
    assert out["fit"]["slope"] == pytest.approx(slope, abs=6 * out["fit"]["slope_stderr"])
    truth = slope * 0.25 + intercept
    assert out["low"] < truth < out["high"]
    # the interval is that of a new observation: wider than the line's own band
    half = out["high"] - out["delta_pct"]
    assert half > out["fit"]["residual_std"]
    assert out["loo"]["spearman_rho"] > 0.9


def test_forecast_refuses_too_few_points_and_unknown_predictors():
    study = _study([(["a", "b"], [(0.1, 1.0)]), (["a", "c"], [(0.2, 2.0)])])
    with pytest.raises(LorasumError, match="at least 3"):
        forecast([study], "max_cross_talk", 0.1)
    with pytest.raises(LorasumError, match="no points with predictor 'nope'"):
        forecast([study], "nope", 0.1)


def test_best_predictor_and_method_recommendation():
    rng = np.random.default_rng(2)
    points = [
        ([f"d{c}", "e"], [(x, 10 * x + 0.01 * rng.normal()) for x in rng.uniform(size=2)])
        for c in range(5)
    ]
    study = _study(points, with_methods=True)
    ranking = rank_predictors([study])
    assert set(ranking) == {"rms_cosine", "max_cross_talk"}
    assert best_predictor(ranking) in ranking
    rec = recommend_method([study])
    best = min(("sum", "regmean"), key=lambda n: rec["table"][n])
    assert rec["method"] == best and rec["n_combinations"] == 5
    assert math.isclose(rec["table"]["regmean"], 5.0)
    near = recommend_method([study], "max_cross_talk", 0.0, nearest=2)
    assert near["n_combinations"] == 2
    assert recommend_method([{"combinations": []}]) is None


def test_fit_points_and_forecast_of_the_second_target():
    """``target="delta_vs_singles_pct"`` reads that key per row and skips rows without it
    (studies from before the split); the forecast fits those points alone."""
    study = _study([(["a", "b"], [(0.1, 1.0), (0.2, 2.0)]), (["a", "c"], [(0.3, 3.0), (0.4, 4.0)])])
    for k, row in enumerate(r for c in study["combinations"] for r in c["per_seed"]):
        if k != 1:
            row["delta_vs_singles_pct"] = -10.0 * row["predictors"]["max_cross_talk"] + 0.5
    x, y, groups = fit_points([study], "max_cross_talk", "delta_vs_singles_pct")
    assert x == [0.1, 0.3, 0.4] and y == pytest.approx([-0.5, -2.5, -3.5])
    assert groups == ["0:a+b", "0:a+c", "0:a+c"]
    out = forecast([study], "max_cross_talk", 0.25, target="delta_vs_singles_pct")
    assert out["delta_pct"] == pytest.approx(-2.0) and out["fit"]["n"] == 3
    assert forecast([study], "max_cross_talk", 0.25)["fit"]["n"] == 4  # Δ% keeps every row
