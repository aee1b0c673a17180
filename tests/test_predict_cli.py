"""`lorasum predict` and `compose --check` on tiny models: the forecast recovers a known linear
relation written into synthetic studies, its interval covers the truth, the drivers are the
largest parts of the predictor, every user mistake is one line with exit 2, and --check does
not change what compose writes."""

import json

import numpy as np
import pytest
from conftest import make_adapter
from safetensors.torch import load_file
from scipy import stats

from lorasum.analysis.predict import predict_interference
from lorasum.cli import main
from lorasum.factors import single_threaded

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SLOPE, INTERCEPT, NOISE = 30.0, -2.0, 0.05
VS_SLOPE, VS_INTERCEPT = -30.0, 1.5  # the sum vs own adapters: a different known line


@pytest.fixture(autouse=True)
def _one_thread():
    with single_threaded():
        yield


@pytest.fixture(scope="module")
def adapters(tiny_llama, tmp_path_factory):
    d = tmp_path_factory.mktemp("adapters")
    return [str(make_adapter(tiny_llama, d / n, r=2, seed=i)) for i, n in enumerate("abc")]


@pytest.fixture(scope="module")
def calibration(qa_files):
    return [str(qa_files["arith"]), str(qa_files["colors"]), str(qa_files["finance"])]


def _write_study(path, xs_per_combination, rng):
    """A results.json whose Δ% is SLOPE·x + INTERCEPT + noise in predictors.max_cross_talk."""
    combinations = []
    for c, xs in enumerate(xs_per_combination):
        rows = [
            {
                "seed": s,
                "delta_pct": SLOPE * x + INTERCEPT + NOISE * rng.normal(),
                "delta_vs_singles_pct": VS_SLOPE * x + VS_INTERCEPT + NOISE * rng.normal(),
                # the weight cosine follows x loosely: a worse leave-one-out rank
                "predictors": {"max_cross_talk": x, "rms_cosine": x * rng.uniform(0.2, 1.8)},
            }
            for s, x in enumerate(xs)
        ]
        combinations.append(
            {
                "domains": [f"d{c}", "e"],
                "per_seed": rows,
                "delta_pct": float(np.mean([r["delta_pct"] for r in rows])),
                "methods": {
                    "sum": {"ppl": 2.0, "delta_pct": 3.0, "category": "data-free"},
                    "regmean_rescaled": {"ppl": 2.0, "delta_pct": -1.0, "category": "calibration"},
                    "coefficients": {"ppl": 2.0, "delta_pct": -5.0, "category": "calibrated"},
                },
            }
        )
    path.mkdir(parents=True, exist_ok=True)
    (path / "results.json").write_text(json.dumps({"combinations": combinations}))
    return path


def test_predict_recovers_a_known_linear_relation(adapters, calibration, tmp_path, capsys):
    pair = adapters[:2]
    rc = main(["predict", *pair, "--calibration", *calibration[:2], "--json"])
    assert rc == 0, capsys.readouterr().err
    x0 = json.loads(capsys.readouterr().out)["predictors"]["max_cross_talk"]
    rng = np.random.default_rng(0)
    studies = [
        _write_study(tmp_path / f"s{k}", rng.uniform(0.5 * x0, 1.5 * x0, size=(4, 3)), rng)
        for k in range(2)
    ]
    args = ["predict", *pair, "--calibration", *calibration[:2], "--fit", *map(str, studies)]
    assert main([*args, "--predictor", "max_cross_talk", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    f = out["forecast"]
    assert f["fit"]["n"] == 24 and f["n_groups"] == 8
    assert f["fit"]["slope"] == pytest.approx(SLOPE, abs=5 * f["fit"]["slope_stderr"])
    truth = SLOPE * x0 + INTERCEPT
    assert f["low"] < truth < f["high"]
    assert out["recommendation"]["method"] == "regmean_rescaled"
    v = out["forecast_vs_singles"]  # the second target, fitted on its own points
    assert v["predictor"] == "max_cross_talk" and v["fit"]["n"] == 24
    assert v["fit"]["slope"] == pytest.approx(VS_SLOPE, abs=5 * v["fit"]["slope_stderr"])
    assert v["low"] < VS_SLOPE * x0 + VS_INTERCEPT < v["high"]
    assert main([*args, "--predictor", "max_cross_talk"]) == 0
    text = capsys.readouterr().out
    assert f"vs each domain's own adapter: {v['delta_pct']:+.2f} %" in text
    # the drivers' shares are parts of κ: they sum to the driving pair's cross-talk
    d = out["drivers"]
    assert d["value"] == pytest.approx(x0)
    top = predict_interference(pair, calibration=calibration[:2], top=1000)["drivers"]
    assert sum(m["part"] for m in top["modules"]) == pytest.approx(x0, rel=1e-9)
    assert sum(m["share"] for m in top["modules"]) == pytest.approx(1.0)
    for name in ("mean_overshoot", "max_orthogonal_cross_talk"):
        parts = predict_interference(pair, predictor=name, calibration=calibration[:2], top=1000)[
            "drivers"
        ]
        assert sum(m["part"] for m in parts["modules"]) == pytest.approx(parts["value"], rel=1e-9)
    cos = predict_interference(pair, predictor="rms_cosine", top=1000)["drivers"]
    assert sum(m["part"] for m in cos["modules"]) == pytest.approx(cos["value"] ** 2)
    # auto picks max_cross_talk (rms_cosine is noisier), text names the parts
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "predicted Δ% of the sum vs merged-data training" in text
    assert "auto: best leave-one-out Spearman" in text and "from max_cross_talk" in text
    assert "driven by" in text and "recommended method (no training): regmean_rescaled" in text
    # next to the predictors' ρ: what knowing each combination's mean Δ% exactly would score
    # (every point predicted by its own (study, combination)'s mean; from the files, by hand)
    ys, means = [], []
    for study in studies:
        for c in json.loads((study / "results.json").read_text())["combinations"]:
            d = [r["delta_pct"] for r in c["per_seed"]]
            ys += d
            means += [float(np.mean(d))] * len(d)
    oracle = stats.spearmanr(means, ys).statistic
    assert out["ranking"]["max_cross_talk"]["oracle_rho"] == pytest.approx(oracle, abs=1e-12)
    assert f"knowing each combination's mean Δ% exactly: {oracle:.2f})" in text


def test_predict_without_fit_lists_predictors_and_falls_back_without_data(
    adapters, calibration, capsys
):
    assert main(["predict", *adapters, "--calibration", *calibration]) == 0
    text = capsys.readouterr().out
    assert "fitting Δ% needs finished studies" in text
    assert text.count("RMS cosine") == 3  # one line per pair
    # adapters trained elsewhere have no recorded data: auto keeps the weight cosine only
    assert main(["predict", *adapters[:2]]) == 0
    text = capsys.readouterr().out
    assert "activation predictors not computed" in text and "rms_cosine" in text


@pytest.mark.parametrize(
    "case, message",
    [
        ("no_results", "has no results.json"),
        ("no_points", "no points with predictor 'max_cross_talk'"),
        ("two_points", "only 2 points"),
        ("one_adapter", "at least two adapters"),
        ("unknown_predictor", "unknown predictor 'cos'"),
        ("two_models", "different"),
        ("fit_without_check", "--fit applies to --check"),
        ("no_data", "no lorasum.json recording its training data"),
    ],
)
def test_mistakes_are_one_line_and_exit_2(
    case, message, adapters, calibration, tiny_gpt2, tmp_path, capsys
):
    pair, cal = adapters[:2], ["--calibration", *calibration[:2]]
    study = tmp_path / "study"
    study.mkdir()
    rows = [{"delta_pct": 1.0, "rms_cosine": 0.1}, {"delta_pct": 2.0, "rms_cosine": 0.2}]
    (study / "results.json").write_text(
        json.dumps({"combinations": [{"domains": ["a", "b"], "per_seed": rows}]})
    )
    argv = {
        "no_results": ["predict", *pair, *cal, "--fit", str(tmp_path)],
        "no_points": ["predict", *pair, *cal, "--fit", str(study), "--predictor", "max_cross_talk"],
        "two_points": ["predict", *pair, "--fit", str(study), "--predictor", "rms_cosine"],
        "one_adapter": ["predict", pair[0]],
        "unknown_predictor": ["predict", *pair, "--predictor", "cos"],
        "two_models": ["predict", pair[0], str(make_adapter(tiny_gpt2, tmp_path / "g", r=2))],
        "fit_without_check": ["compose", *pair, "--out", str(tmp_path / "o"), "--fit", str(study)],
        "no_data": ["predict", *pair, "--predictor", "max_cross_talk"],
    }[case]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("lorasum: error: ") and message in err
    assert err.count("\n") == 1


def test_compose_check_warns_and_writes_the_same_adapter(adapters, calibration, tmp_path, capsys):
    rng = np.random.default_rng(1)
    study = _write_study(tmp_path / "study", rng.uniform(0.1, 2.0, size=(4, 2)), rng)
    plain, checked = tmp_path / "plain", tmp_path / "checked"
    assert main(["compose", *adapters[:2], "--out", str(plain)]) == 0
    capsys.readouterr()
    argv = ["compose", *adapters[:2], "--out", str(checked), "--check", "--fit", str(study)]
    assert main([*argv, "--calibration", *calibration[:2]]) == 2  # sum takes no calibration
    assert "does not apply to sum" in capsys.readouterr().err
    assert main(argv) == 0  # adapters made elsewhere: the check falls back to the weight cosine
    text = capsys.readouterr().out
    assert text.index("interference check") < text.index("composed adapter written")
    assert "activation predictors not computed" in text
    a = load_file(str(plain / "adapter_model.safetensors"))
    b = load_file(str(checked / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
