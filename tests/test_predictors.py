"""The registry of interference predictors: the registered names and their order (what studies
record and `lorasum predict` accepts), selection by need, refusals, each family's function
against the functions it wraps, and a new family added by one registration."""

import itertools

import numpy as np
import pytest
import torch
from conftest import make_adapter

from lorasum.analysis import forecast
from lorasum.analysis.predict import predict_interference
from lorasum.analysis.predictors import (
    ADAPTER_NEEDS,
    NEEDS,
    Predictor,
    PredictorFamily,
    PredictorInputs,
    compute,
    families,
    family_of,
    get_family,
    predictor_labels,
    predictor_names,
    register,
    registry,
)
from lorasum.analysis.predictors.activation import combination_predictors, interference_predictors
from lorasum.analysis.predictors.transfer import transfer_predictor
from lorasum.analysis.similarity import combination_rms, similarity_matrix
from lorasum.errors import LorasumError
from lorasum.factors import LoraFactors

# the names studies have recorded since they were introduced, in results.json's order
ADAPTER = (
    "rms_cosine",
    "rms_activation_cosine",
    "max_cross_talk",
    "mean_cross_talk",
    "mean_overshoot",
    "max_orthogonal_cross_talk",
    "mean_orthogonal_cross_talk",
)
DATA = (
    "grad_cosine_rms",
    "grad_cosine_mean",
    "grad_cosine_global",
    "base_loss_mean",
    "base_loss_spread",
)
TRANSFER = ("transfer", "transfer_share")
DOMAINS = ("a", "b", "c")
COMBOS = [("a", "b"), ("a", "c"), ("b", "c"), ("a", "b", "c")]


def _adapters(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    shapes = {"l.0.q": (6, 5), "l.0.v": (4, 5), "l.1.q": (6, 5)}
    out = {}
    for d in DOMAINS:
        out[d] = {
            m: LoraFactors(
                torch.randn(2, d_in, generator=g), torch.randn(d_out, 2, generator=g), 0.5
            )
            for m, (d_out, d_in) in shapes.items()
            if not (d == "c" and m == "l.0.v")  # c lacks a module: unshared modules count too
        }
    return out


def _grams(seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    grams = {}
    for d in DOMAINS:
        x = {
            m: torch.randn(5, 9, generator=g, dtype=torch.float64)
            for m in ("l.0.q", "l.0.v", "l.1.q")
        }
        grams[d] = {m: v @ v.T / 9 for m, v in x.items()}  # per-token Ĝ (d_in, d_in)
    return grams


def test_registered_names_keep_their_order():
    assert [f.name for f in families()] == ["weight", "activation", "data", "transfer"]
    assert predictor_names() == (*ADAPTER, *DATA, *TRANSFER)
    assert predictor_names(ADAPTER_NEEDS) == ADAPTER  # `lorasum predict ADAPTER…`
    assert predictor_names(needing="base_model_data") == DATA  # `lorasum predict --domains`
    assert predictor_names(needing="cross_domain") == TRANSFER
    assert predictor_names({"adapters"}) == ("rms_cosine",)  # no calibration: the cosine only
    assert [f.name for f in families(needing="calibration")] == ["activation"]
    assert forecast.available_predictors(
        [{"combinations": [{"predictors": {n: 0.1 for n in reversed(predictor_names())}}]}]
    ) == list(predictor_names())
    assert set(NEEDS) == {n for f in families() for n in f.needs}
    labels = predictor_labels()
    assert labels["rms_cosine"] == "RMS cosine of the adapters' ΔW"
    assert "mean_overshoot" not in labels  # no label: shown by name


def test_lookups_and_refusals():
    assert get_family("data").needs == {"base_model_data"}
    assert family_of("transfer_share").name == "transfer"
    with pytest.raises(
        LorasumError, match="unknown predictor family 'nope'; choose one of: weight"
    ):
        get_family("nope")
    with pytest.raises(LorasumError, match="unknown predictor 'nope'; choose one of: rms_cosine"):
        family_of("nope")
    weight = get_family("weight")
    with pytest.raises(ValueError, match="already registered"):
        register(weight)
    clash = PredictorFamily(
        "other", (Predictor("rms_cosine"),), frozenset({"adapters"}), weight.compute, ""
    )
    with pytest.raises(ValueError, match="already taken"):
        register(clash)
    with pytest.raises(ValueError, match="each need is one of"):
        PredictorFamily("x", (Predictor("x"),), frozenset({"weights"}), weight.compute, "")
    with pytest.raises(ValueError, match="unknown need"):
        families(needing="weights")
    with pytest.raises(LorasumError, match="activation needs calibration"):
        compute(families(ADAPTER_NEEDS), PredictorInputs(adapters=_adapters()), COMBOS)


def test_weight_family_is_the_studys_rms_cosine():
    adapters = _adapters()
    out = compute([get_family("weight")], PredictorInputs(adapters=adapters), COMBOS)
    pairs = similarity_matrix(adapters)  # what a study records as rms_cosine
    assert list(out) == ["+".join(c) for c in COMBOS]
    for c in COMBOS:
        assert out["+".join(c)] == {"rms_cosine": combination_rms(pairs, c)}
    with pytest.raises(LorasumError, match="no adapter for domain"):
        compute([get_family("weight")], PredictorInputs(adapters=adapters), [("a", "z")])


def test_activation_family_is_combination_predictors_without_the_cosine():
    adapters, grams = _adapters(), _grams()
    inputs = PredictorInputs(adapters=adapters, grams=grams)
    out = compute(families(needing="calibration"), inputs, COMBOS)
    result = interference_predictors(adapters, grams)
    for c in COMBOS:
        expected = dict(combination_predictors(result, c))
        del expected["rms_cosine"]  # the weight family's
        assert out["+".join(c)] == expected
        assert list(out["+".join(c)]) == list(get_family("activation").names)
    both = compute(families(ADAPTER_NEEDS), inputs, COMBOS)  # weight, then activation
    for c in COMBOS:
        values = combination_predictors(result, c)
        assert list(both["+".join(c)]) == list(ADAPTER)
        assert both["+".join(c)]["rms_cosine"] == values["rms_cosine"]


def test_transfer_family_is_transfer_predictor():
    table = {
        "base": {"a": 10.0, "b": 20.0, "c": 8.0},
        **{d: {e: 5.0 + i + 2 * j for j, e in enumerate(DOMAINS)} for i, d in enumerate(DOMAINS)},
    }
    out = compute(families(needing="cross_domain"), PredictorInputs(cross_domain=table), COMBOS)
    assert out == transfer_predictor(table, COMBOS)


def test_a_new_family_is_one_registration(monkeypatch, tiny_llama, tmp_path):
    adapters = [make_adapter(tiny_llama, tmp_path / d, r=2, seed=i) for i, d in enumerate("ab")]
    before = predict_interference(adapters, predictor="rms_cosine")["predictors"]
    assert before == {"rms_cosine": before["rms_cosine"]}
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    def count(inputs, combos):  # a toy predictor: how many domains, from the adapters alone
        return {"+".join(c): {"n_domains": float(len(c))} for c in combos}

    register(
        PredictorFamily(
            "toy", (Predictor("n_domains", "domains"),), frozenset({"adapters"}), count, "toy"
        )
    )
    assert predictor_names()[-1] == "n_domains"
    assert predictor_names(ADAPTER_NEEDS) == (*ADAPTER, "n_domains")
    assert predictor_labels()["n_domains"] == "domains"
    out = compute(families({"adapters"}), PredictorInputs(adapters=_adapters()), COMBOS)
    assert [out["+".join(c)]["n_domains"] for c in COMBOS] == [2.0, 2.0, 2.0, 3.0]
    # `lorasum predict` computes it beside the cosine, without calibration
    after = predict_interference(adapters, predictor="rms_cosine")["predictors"]
    assert after == {**before, "n_domains": 2.0}
    studies = [
        {
            "combinations": [
                {
                    "domains": list(c),
                    "predictors": {"n_domains": float(len(c)) + 0.1 * k},
                    "delta_pct": 3.0 * len(c) + k,
                }
                for k, c in enumerate(itertools.islice(itertools.cycle(COMBOS), 8))
            ]
        }
    ]
    assert "n_domains" in forecast.available_predictors(studies)
    rows = studies[0]["combinations"]
    slope, intercept = np.polyfit(
        [r["predictors"]["n_domains"] for r in rows], [r["delta_pct"] for r in rows], 1
    )
    predicted = forecast.forecast(studies, "n_domains", 2.0)["delta_pct"]
    assert predicted == pytest.approx(slope * 2.0 + intercept, rel=1e-9)
