"""Adapters on disk and exact composition, against PEFT as the oracle."""

import json

import pytest
import torch
from conftest import load_tiny, make_adapter

from lorasum.adapters import check_fits, read_adapter
from lorasum.compose import compose
from lorasum.errors import LorasumError
from lorasum.factors import delta


def peft_logits(model_dir, adapters: list, ids: torch.Tensor) -> torch.Tensor:
    """Logits with several adapters active together in PEFT (their outputs add up)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_tiny(model_dir), str(adapters[0]), adapter_name="a0")
    for i, path in enumerate(adapters[1:], start=1):
        model.load_adapter(str(path), adapter_name=f"a{i}")
    model.base_model.set_adapter([f"a{i}" for i in range(len(adapters))])
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_read_adapter_matches_peft_delta(tiny_model, tmp_path):
    from peft import PeftModel

    path = make_adapter(tiny_model, tmp_path / "a", r=3, alpha=12.0, seed=1)
    adapter = read_adapter(path)
    peft_model = PeftModel.from_pretrained(load_tiny(tiny_model), str(path))
    assert adapter.modules, "no modules read"
    for name, f in adapter.modules.items():
        layer = peft_model.base_model.model.get_submodule(name)
        expected = layer.get_delta_weight("default")  # PEFT's own ΔW, in the weight's layout
        ours = delta(f.A, f.B, f.scale)
        if layer.fan_in_fan_out:
            ours = ours.T  # GPT-2 Conv1D stores weights (d_in, d_out)
        assert ours.abs().max() > 0
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


def test_rslora_scale(tiny_llama, tmp_path):
    path = make_adapter(tiny_llama, tmp_path / "a", r=4, alpha=8.0, use_rslora=True)
    f = next(iter(read_adapter(path).modules.values()))
    assert f.scale == pytest.approx(8.0 / 2.0)


@pytest.mark.parametrize("weights", [None, "1,1", "0.5,-1.5"])
def test_merge_into_base_equals_w_plus_sum(tiny_model, tmp_path, weights):
    """merged == W + Σ w·s·B·A (Conv1D transposed), to 1e-5."""
    a = make_adapter(tiny_model, tmp_path / "a", r=2, alpha=16.0, seed=1)
    b = make_adapter(tiny_model, tmp_path / "b", r=4, alpha=4.0, seed=2)
    compose(
        [a, b],
        tmp_path / "sum",
        weights=weights,
        merge_into_base=tmp_path / "merged",
        model=str(tiny_model),
    )
    w = [1.0, 1.0] if weights is None else [float(x) for x in weights.split(",")]
    base = dict(load_tiny(tiny_model).named_parameters())
    merged = dict(load_tiny(tmp_path / "merged").named_parameters())
    fa, fb = read_adapter(a).modules, read_adapter(b).modules
    is_gpt2 = "transformer" in next(iter(fa))
    for name in fa:
        expected = w[0] * delta(fa[name].A, fa[name].B, fa[name].scale) + w[1] * delta(
            fb[name].A, fb[name].B, fb[name].scale
        )
        if is_gpt2:
            expected = expected.T
        key = f"{name}.weight"
        torch.testing.assert_close(merged[key], base[key] + expected, rtol=1e-5, atol=1e-5)
    untouched = [k for k in base if not any(k.startswith(n) for n in fa)]
    for k in untouched:
        torch.testing.assert_close(merged[k], base[k])


def test_composed_adapter_equals_adapters_applied_together(tiny_model, tmp_path):
    from peft import PeftModel

    a = make_adapter(tiny_model, tmp_path / "a", r=2, alpha=16.0, seed=1)
    b = make_adapter(tiny_model, tmp_path / "b", r=4, alpha=4.0, seed=2)
    compose([a, b], tmp_path / "sum")
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    expected = peft_logits(tiny_model, [a, b], ids)
    composed = PeftModel.from_pretrained(load_tiny(tiny_model), str(tmp_path / "sum")).eval()
    with torch.no_grad():
        got = composed(input_ids=ids).logits
        base = load_tiny(tiny_model)(input_ids=ids).logits
    assert (got - base).abs().max() > 1e-3  # the adapters really change the output
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_compose_different_ranks_alphas_and_targets(tiny_llama, tmp_path):
    from peft import PeftModel

    a = make_adapter(
        tiny_llama, tmp_path / "a", r=2, alpha=4.0, targets=["q_proj", "v_proj"], seed=1
    )
    b = make_adapter(
        tiny_llama,
        tmp_path / "b",
        r=6,
        alpha=32.0,
        targets=["v_proj", "o_proj", "down_proj"],
        seed=2,
        use_rslora=True,
    )
    compose([a, b], tmp_path / "sum")
    cfg = json.loads((tmp_path / "sum" / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 8
    ids = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(1))
    expected = peft_logits(tiny_llama, [a, b], ids)
    composed = PeftModel.from_pretrained(load_tiny(tiny_llama), str(tmp_path / "sum")).eval()
    with torch.no_grad():
        got = composed(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_compose_reuses_and_refuses_other_results(tiny_llama, tmp_path):
    a = make_adapter(tiny_llama, tmp_path / "a", seed=1)
    b = make_adapter(tiny_llama, tmp_path / "b", seed=2)
    compose([a, b], tmp_path / "sum")
    mtime = (tmp_path / "sum" / "adapter_model.safetensors").stat().st_mtime_ns
    compose([a, b], tmp_path / "sum")
    assert (tmp_path / "sum" / "adapter_model.safetensors").stat().st_mtime_ns == mtime
    with pytest.raises(LorasumError, match="--overwrite"):
        compose([a, b], tmp_path / "sum", weights="1,2")
    compose([a, b], tmp_path / "sum", weights="1,2", overwrite=True)


def _corrupt(kind, path):
    if kind == "no_config":
        (path / "adapter_config.json").unlink()
    elif kind == "no_weights":
        (path / "adapter_model.safetensors").unlink()
    elif kind == "bad_json":
        (path / "adapter_config.json").write_text("{not json")
    elif kind == "bad_weights":
        (path / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10)
    elif kind == "not_lora":
        cfg = json.loads((path / "adapter_config.json").read_text())
        cfg["peft_type"] = "IA3"
        (path / "adapter_config.json").write_text(json.dumps(cfg))
    elif kind == "rank_mismatch":
        cfg = json.loads((path / "adapter_config.json").read_text())
        cfg["r"] = 7
        (path / "adapter_config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "kind",
    [
        "no_config",
        "no_weights",
        "bad_json",
        "bad_weights",
        "not_lora",
        "rank_mismatch",
        "missing_dir",
    ],
)
def test_bad_adapters_raise_one_clear_error(tiny_llama, tmp_path, kind):
    good = make_adapter(tiny_llama, tmp_path / "good", seed=1)
    bad = (
        tmp_path / "missing"
        if kind == "missing_dir"
        else make_adapter(tiny_llama, tmp_path / "bad", seed=2)
    )
    if kind != "missing_dir":
        _corrupt(kind, bad)
    with pytest.raises(LorasumError) as e:
        compose([good, bad], tmp_path / "out")
    assert str(bad) in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temp left over


def test_adapters_of_different_base_models_are_refused(tiny_llama, tiny_gpt2, tmp_path):
    a = make_adapter(tiny_llama, tmp_path / "a")
    b = make_adapter(tiny_gpt2, tmp_path / "b")
    with pytest.raises(LorasumError, match="different base models"):
        compose([a, b], tmp_path / "out")
    # an adapter that does not fit a model is reported before any forward pass
    with pytest.raises(LorasumError, match="does not fit"):
        check_fits(read_adapter(a), load_tiny(tiny_gpt2), "gpt2-tiny")
    assert not (tmp_path / "out").exists()
