"""Adapter-free predictors per combination: the definitions on hand-made matrices, `data_predictors`
against the pairwise statistics, the study's statistics and figures taking the new names as
they come, and `lorasum predict --domains` (values, forecast from studies, one-line errors)."""

import itertools
import json
import math

import numpy as np
import pytest
from conftest import load_tiny

from lorasum.analysis.predictors import predictor_names
from lorasum.analysis.predictors.data import (
    combination_values,
    data_predictors,
    gradient_statistics,
)
from lorasum.analysis.predictors.transfer import transfer_predictor
from lorasum.cli import main
from lorasum.data import load_split
from lorasum.errors import LorasumError
from lorasum.models import load_tokenizer

SLOPE, INTERCEPT, NOISE = -40.0, 5.0, 0.05


def test_transfer_on_a_hand_made_matrix():
    ppl = {
        "base": {"a": 10.0, "b": 20.0, "c": 8.0},
        "a": {"a": 5.0, "b": 18.0, "c": 8.0},
        "b": {"a": 9.0, "b": 10.0, "c": 4.0},
        "c": {"a": 12.0, "b": 20.0, "c": 9.0},  # c's own adapter makes c worse
    }
    out = transfer_predictor({"perplexity": ppl, "domains": ["a", "b", "c"]}, [("a", "b")])
    # domain a under b: 9/10 - 1 = -10 %; domain b under a: 18/20 - 1 = -10 %
    assert out["a+b"]["transfer"] == pytest.approx(-10.0)
    share_ab = math.log(10 / 9) / math.log(10 / 5)  # a under b, of a's own gain
    share_ba = math.log(20 / 18) / math.log(20 / 10)
    assert out["a+b"]["transfer_share"] == pytest.approx((share_ab + share_ba) / 2)
    triple = transfer_predictor(ppl, [("a", "b", "c")])["a+b+c"]
    changes = [ppl[j][i] / ppl["base"][i] - 1 for i, j in itertools.permutations("abc", 2)]
    assert triple["transfer"] == pytest.approx(100 * sum(changes) / 6)
    shares = [  # ordered pairs whose own adapter helps: domains a and b only
        math.log(ppl["base"][i] / ppl[j][i]) / math.log(ppl["base"][i] / ppl[i][i])
        for i, j in itertools.permutations("abc", 2)
        if i != "c"
    ]
    assert triple["transfer_share"] == pytest.approx(sum(shares) / len(shares))
    with pytest.raises(LorasumError, match="lacks adapter"):
        transfer_predictor(ppl, [("a", "d")])
    with pytest.raises(LorasumError, match="'base'"):
        transfer_predictor({"a": {"a": 1.0}}, [("a", "b")])


def test_combination_values_aggregate_pairs():
    cos = {
        "names": ["x", "y", "z"],
        "rms": [[1, 0.3, 0.4], [0.3, 1, 0.5], [0.4, 0.5, 1]],
        "mean": [[1, -0.1, 0.2], [-0.1, 1, 0.3], [0.2, 0.3, 1]],
        "global": [[1, 0.0, 0.6], [0.0, 1, 0.9], [0.6, 0.9, 1]],
        "loss": {"x": 2.0, "y": 3.5, "z": 1.0},
    }
    pair = combination_values(cos, ("y", "z"))
    assert pair == {
        "grad_cosine_rms": pytest.approx(0.5),
        "grad_cosine_mean": pytest.approx(0.3),
        "grad_cosine_global": pytest.approx(0.9),
        "base_loss_mean": pytest.approx(2.25),
        "base_loss_spread": pytest.approx(2.5),
    }
    triple = combination_values(cos, ("x", "y", "z"))
    assert triple["grad_cosine_rms"] == pytest.approx(math.sqrt((0.09 + 0.16 + 0.25) / 3))
    assert triple["grad_cosine_mean"] == pytest.approx(0.4 / 3)
    assert triple["base_loss_spread"] == pytest.approx(2.5)
    with pytest.raises(LorasumError, match="w"):
        combination_values(cos, ("x", "w"))


@pytest.fixture(scope="module")
def sources(qa_files):
    out = {}
    for d in ("arith", "colors", "finance"):
        out[d] = load_split(str(qa_files[d]), 42, max_train=20)
        out[d].name = d
    return out


def test_data_predictors_follow_the_pairwise_statistics(tiny_llama, sources, tmp_path):
    model, tok = load_tiny(tiny_llama), load_tokenizer(str(tiny_llama))
    combos = [("arith", "colors"), ("arith", "finance"), ("arith", "colors", "finance")]
    kw = {"model_spec": "tiny", "cache_dir": tmp_path}
    values = data_predictors(model, tok, sources, combos, 48, "auto", **kw)
    assert list(values) == ["arith+colors", "arith+finance", "arith+colors+finance"]
    stats = gradient_statistics(model, tok, sources, 48, "auto", **kw)
    assert not any(stats["computed"].values())  # every domain read from the cache
    for c in combos:
        assert values["+".join(c)] == combination_values(stats, c)
        assert set(values["+".join(c)]) == set(predictor_names(needing="base_model_data"))
    i, j = stats["names"].index("arith"), stats["names"].index("colors")
    assert values["arith+colors"]["grad_cosine_rms"] == pytest.approx(stats["rms"][i][j])
    with pytest.raises(LorasumError, match="no data source"):
        data_predictors(model, tok, sources, [("arith", "nope")], 48, **kw)


def test_study_statistics_and_figure_take_new_predictor_names():
    from lorasum.analysis.forecast import loo_prediction
    from lorasum.report import plots
    from lorasum.study.results import statistics

    rng = np.random.default_rng(1)
    rows = []
    for c in range(5):
        x = float(c) / 10
        per_seed = [
            {
                "seed": s,
                "delta_pct": SLOPE * x + NOISE * rng.normal(),
                "predictors": {"rms_cosine": rng.uniform(), "grad_cosine_rms": x, "transfer": -x},
            }
            for s in range(2)
        ]
        rows.append(
            {
                "domains": [f"d{c}", "e"],
                "per_seed": per_seed,
                "predictors": {
                    k: float(np.mean([r["predictors"][k] for r in per_seed]))
                    for k in per_seed[0]["predictors"]
                },
                "delta_pct": float(np.mean([r["delta_pct"] for r in per_seed])),
            }
        )
    pred = loo_prediction(rows)
    assert set(pred) == {"rms_cosine", "grad_cosine_rms", "transfer"}
    assert pred["grad_cosine_rms"]["spearman_rho"] > 0.9  # Δ% follows it (seeds tie in x)
    assert pred["transfer"]["oracle_rho"] is not None
    assert "grad_cosine_rms" in statistics(rows)
    assert "gradients" in plots.PREDICTOR_LABELS["grad_cosine_rms"]
    many = {f"p{k}": pred["grad_cosine_rms"] for k in range(6)}  # six panels: two rows
    assert plots.predicted_vs_measured(many)[:4] == b"\x89PNG"


def _study(path, xs, rng):
    """results.json whose Δ% is SLOPE·x + INTERCEPT + noise in predictors.grad_cosine_rms."""
    combinations = []
    for c, x in enumerate(xs):
        rows = [
            {
                "seed": s,
                "delta_pct": SLOPE * x + INTERCEPT + NOISE * rng.normal(),
                "predictors": {"grad_cosine_rms": x, "base_loss_mean": rng.uniform()},
            }
            for s in range(3)
        ]
        combinations.append({"domains": [f"d{c}", "e"], "per_seed": rows})
    path.mkdir(parents=True, exist_ok=True)
    (path / "results.json").write_text(json.dumps({"combinations": combinations}))
    return path


def test_predict_domains_cli(tiny_llama, qa_files, tmp_path, monkeypatch, capsys, sources):
    monkeypatch.setenv("LORASUM_HOME", str(tmp_path / "home"))
    domains = ",".join(f"{d}={qa_files[d]}" for d in ("arith", "colors", "finance"))
    base = ["predict", "--domains", domains, "--model", str(tiny_llama)]
    base += ["--max-length", "48", "--max-train", "20"]
    assert main([*base, "--json"]) == 0, capsys.readouterr().err
    out = json.loads(capsys.readouterr().out)
    assert list(out["predictors"]) == [
        "arith+colors",
        "arith+finance",
        "colors+finance",
        "arith+colors+finance",
    ]
    # the same numbers as the library on the same rows, without any cache
    model, tok = load_tiny(tiny_llama), load_tokenizer(str(tiny_llama))
    stats = gradient_statistics(model, tok, sources, 48, "auto", model_spec="x", cache=False)
    for pair in out["pairs"]:
        i, j = stats["names"].index(pair["a"]), stats["names"].index(pair["b"])
        assert pair["rms"] == pytest.approx(stats["rms"][i][j], abs=1e-6)
        assert pair["mean"] == pytest.approx(stats["mean"][i][j], abs=1e-6)
    assert out["base_loss"] == pytest.approx(stats["loss"], rel=1e-6)
    assert out["forecast"] is None
    # a forecast from studies that carry the predictor: the known line, its interval
    rng = np.random.default_rng(0)
    xs = [v["grad_cosine_rms"] for v in out["predictors"].values()]
    lo, hi = min(xs) * 0.5, max(xs) * 1.5
    studies = [str(_study(tmp_path / f"s{k}", rng.uniform(lo, hi, 6), rng)) for k in range(2)]
    assert main([*base, "--fit", *studies, "--json"]) == 0, capsys.readouterr().err
    fitted = json.loads(capsys.readouterr().out)
    assert fitted["predictor"] == "grad_cosine_rms"  # auto: base_loss_mean is noise there
    assert set(fitted["ranking"]) == {"grad_cosine_rms", "base_loss_mean"}
    for name, f in fitted["forecast"].items():
        x0 = fitted["predictors"][name]["grad_cosine_rms"]
        assert f["x"] == pytest.approx(x0)
        assert f["low"] < SLOPE * x0 + INTERCEPT < f["high"]
    assert main([*base, "--fit", *studies]) == 0
    text = capsys.readouterr().out
    assert "arith+colors+finance" in text and "forecast from grad_cosine_rms" in text
    assert "leave-one-out Spearman per predictor: grad_cosine_rms" in text


@pytest.mark.parametrize(
    "extra, message",
    [
        (["adapter_dir"], "--domains replaces adapters"),
        (["--predictor", "max_cross_talk"], "unknown predictor"),
        (["--max-order", "1"], "at least 2 domains"),
        (["--fit", "STUDY"], "no adapter-free predictors"),
    ],
)
def test_predict_domains_errors_are_one_line(extra, message, qa_files, tmp_path, capsys):
    study = tmp_path / "study"
    study.mkdir()
    (study / "results.json").write_text(
        json.dumps({"combinations": [{"domains": ["a", "b"], "predictors": {"rms_cosine": 0.1}}]})
    )
    extra = [str(study) if e == "STUDY" else e for e in extra]
    domains = f"a={qa_files['arith']},b={qa_files['colors']}"
    assert main(["predict", "--domains", domains, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
