"""Similarity of adapters on disk: factored cosine against PEFT's dense ΔW."""

import pytest
import torch
from conftest import load_tiny, make_adapter

from lorasum.analysis.similarity import combination_rms, similarity
from lorasum.errors import LorasumError
from lorasum.factors import rms


def test_similarity_matches_dense_cosine_of_peft_deltas(tiny_model, tmp_path):
    from peft import PeftModel

    a = make_adapter(tiny_model, tmp_path / "a", r=2, alpha=16.0, seed=1)
    b = make_adapter(tiny_model, tmp_path / "b", r=5, alpha=4.0, seed=2)
    c = make_adapter(tiny_model, tmp_path / "c", r=3, alpha=8.0, seed=3)
    result = similarity([a, b, c])
    assert [(p["a"], p["b"]) for p in result["pairs"]] == [("a", "b"), ("a", "c"), ("b", "c")]
    pair = result["pairs"][0]
    pa = PeftModel.from_pretrained(load_tiny(tiny_model), str(a))
    pb = PeftModel.from_pretrained(load_tiny(tiny_model), str(b))
    dense_cos = {}
    for name in pair["modules"]:
        da = pa.base_model.model.get_submodule(name).get_delta_weight("default").flatten()
        db = pb.base_model.model.get_submodule(name).get_delta_weight("default").flatten()
        dense_cos[name] = float(torch.nn.functional.cosine_similarity(da, db, dim=0))
    assert len(dense_cos) > 0
    for name, cos in pair["modules"].items():
        assert cos == pytest.approx(dense_cos[name], abs=1e-5)
    assert pair["rms_cosine"] == pytest.approx(rms(list(dense_cos.values())), abs=1e-6)
    assert pair["unshared_modules"] == []


def test_identical_adapters_have_cosine_one(tiny_llama, tmp_path):
    a = make_adapter(tiny_llama, tmp_path / "a", seed=1)
    b = make_adapter(tiny_llama, tmp_path / "b", seed=1)
    pair = similarity([a, b])["pairs"][0]
    assert pair["rms_cosine"] == pytest.approx(1.0, abs=1e-9)
    assert pair["global_cosine"] == pytest.approx(1.0, abs=1e-9)


def test_combination_rms_is_rms_over_pairs():
    pairs = [
        {"a": "x", "b": "y", "rms_cosine": 0.1},
        {"a": "x", "b": "z", "rms_cosine": 0.2},
        {"a": "y", "b": "z", "rms_cosine": 0.4},
    ]
    assert combination_rms(pairs, ("x", "y")) == pytest.approx(0.1)
    assert combination_rms(pairs, ("x", "y", "z")) == pytest.approx(rms([0.1, 0.2, 0.4]))


def test_similarity_errors(tiny_llama, tmp_path):
    a = make_adapter(tiny_llama, tmp_path / "a", targets=["q_proj"], seed=1)
    b = make_adapter(tiny_llama, tmp_path / "b", targets=["v_proj"], seed=2)
    with pytest.raises(LorasumError, match="at least two"):
        similarity([a])
    with pytest.raises(LorasumError, match="share no module"):
        similarity([a, b])
