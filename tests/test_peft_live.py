"""`lorasum.add_weighted_adapter`: composition of a live PeftModel's LoRA adapters in memory.

Oracles: the dense definition Σ w_i·s_i·B_i·A_i from the loaded layers' own weights and
scales (float64), PEFT's exact ``add_weighted_adapter(combination_type="cat")``, and
`lorasum.compose` of the same adapters from disk.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import load_tiny, make_adapter

import lorasum
from lorasum.adapters import read_adapter
from lorasum.errors import LorasumError
from lorasum.peft_live import lora_layers

NAMES = ("a", "b", "c")


def pattern_adapter(model_dir: Path, out: Path, seed: int = 3) -> Path:
    """A LoRA adapter with rank_pattern and alpha_pattern (random non-zero A and B)."""
    from peft import LoraConfig, get_peft_model

    model = load_tiny(model_dir)
    gpt2 = model.config.model_type == "gpt2"
    torch.manual_seed(seed)
    config = LoraConfig(
        r=3,
        lora_alpha=6.0,
        target_modules=["c_attn", "c_proj"] if gpt2 else ["q_proj", "v_proj", "down_proj"],
        rank_pattern={"c_attn": 5} if gpt2 else {"q_proj": 5, "layers.1.self_attn.v_proj": 2},
        alpha_pattern={"h.1.attn.c_proj": 3.0} if gpt2 else {"down_proj": 10.0},
        init_lora_weights=False,
        fan_in_fan_out=gpt2,
        task_type="CAUSAL_LM",
        base_model_name_or_path=str(model_dir),
    )
    get_peft_model(model, config).save_pretrained(out)
    return out


def two_adapters(model_dir: Path, tmp_path: Path) -> list[Path]:
    """r=2 (alpha 16) on the default modules and r=4 (alpha 4) on fewer modules."""
    gpt2 = "gpt2" in model_dir.name
    return [
        make_adapter(model_dir, tmp_path / "a", r=2, alpha=16.0, seed=1),
        make_adapter(
            model_dir,
            tmp_path / "b",
            r=4,
            alpha=4.0,
            seed=2,
            targets=["c_attn"] if gpt2 else ["q_proj", "v_proj", "down_proj"],
        ),
    ]


def load_peft(model_dir: Path, paths: list[Path]):
    """One PeftModel holding ``paths`` as adapters a, b, c, …"""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_tiny(model_dir), str(paths[0]), adapter_name="a")
    for name, path in zip(NAMES[1:], paths[1:], strict=False):
        model.load_adapter(str(path), adapter_name=name)
    return model.eval()


def layer_delta(layer, name: str) -> torch.Tensor:
    """scaling·B·A of one adapter at one layer, float64, (d_out, d_in)."""
    A = layer.lora_A[name].weight.detach().double()  # (r, d_in)
    B = layer.lora_B[name].weight.detach().double()  # (d_out, r)
    return float(layer.scaling[name]) * B @ A


def dense_sum(model, names, weights) -> dict[str, torch.Tensor]:
    """The definition Σ w_i·s_i·B_i·A_i per module, from the loaded layers' own weights."""
    out = {}
    for module, layer in lora_layers(model).items():
        terms = [
            w * layer_delta(layer, n)
            for n, w in zip(names, weights, strict=True)
            if n in layer.lora_A
        ]
        if terms:
            out[module] = sum(terms)
    return out


def new_deltas(model, name: str) -> dict[str, torch.Tensor]:
    return {
        m: layer_delta(layer, name)
        for m, layer in lora_layers(model).items()
        if name in layer.lora_A
    }


def logits(model, adapter: str) -> torch.Tensor:
    model.set_adapter(adapter)
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids).logits


def assert_deltas_equal(got: dict, expected: dict, rtol: float, atol: float) -> None:
    assert sorted(got) == sorted(expected)
    for module in expected:
        assert expected[module].abs().max() > 0, f"{module}: zero ΔW, the test would be vacuous"
        torch.testing.assert_close(got[module], expected[module], rtol=rtol, atol=atol)


@pytest.mark.parametrize("weights", [[1.0, 1.0], [0.5, -1.5]])
def test_sum_is_the_dense_sum_and_peft_cat(tiny_model, tmp_path, weights):
    """ΔW per module == Σ w_i·s_i·B_i·A_i (fp32 factors vs float64 oracle: rtol 1e-5, atol
    1e-6); logits == PEFT's exact `cat` (rtol 1e-5, atol 1e-5); rank Σr, scale 1."""
    model = load_peft(tiny_model, two_adapters(tiny_model, tmp_path))
    expected = dense_sum(model, ["a", "b"], weights)
    returned = lorasum.add_weighted_adapter(model, ["a", "b"], weights)
    assert returned is model and model.active_adapter == "composed"
    config = model.peft_config["composed"]
    assert (config.r, config.lora_alpha, config.use_rslora) == (6, 6, False)
    assert_deltas_equal(new_deltas(model, "composed"), expected, rtol=1e-5, atol=1e-6)
    model.add_weighted_adapter(["a", "b"], weights, "peft_cat", combination_type="cat")
    torch.testing.assert_close(
        logits(model, "composed"), logits(model, "peft_cat"), rtol=1e-5, atol=1e-5
    )
    assert not torch.allclose(logits(model, "composed"), logits(model, "a"), atol=1e-3)


def test_sum_exact_with_rslora_mixed_ranks_and_patterns(tiny_model, tmp_path):
    """rsLoRA (s = α/√r), r = 2 and 4, rank_pattern/alpha_pattern: PEFT's own layer.scaling
    is what is summed (rtol 1e-5, atol 1e-6); logits == PEFT's `cat` with a plain-LoRA
    adapter first (rtol 1e-5, atol 1e-5; PEFT's `cat` copies use_rslora from the first
    adapter, so an rsLoRA adapter first would scale its result by √R)."""
    paths = [
        make_adapter(tiny_model, tmp_path / "a", r=2, alpha=8.0, seed=1, use_rslora=True),
        make_adapter(tiny_model, tmp_path / "b", r=4, alpha=4.0, seed=2),
        pattern_adapter(tiny_model, tmp_path / "c"),
    ]
    model = load_peft(tiny_model, paths)
    layers = lora_layers(model).values()
    scales = {n: {float(layer.scaling[n]) for layer in layers if n in layer.scaling} for n in "abc"}
    assert scales["a"] == {8.0 / math.sqrt(2)} and scales["b"] == {1.0} and len(scales["c"]) >= 3
    weights = [0.7, 1.0, -0.4]
    expected = dense_sum(model, list("abc"), weights)
    lorasum.add_weighted_adapter(model, ["a", "b", "c"], weights, adapter_name="abc")
    assert_deltas_equal(new_deltas(model, "abc"), expected, rtol=1e-5, atol=1e-6)
    model.add_weighted_adapter(
        ["b", "c", "a"], [1.0, -0.4, 0.7], "peft_cat", combination_type="cat"
    )
    torch.testing.assert_close(
        logits(model, "abc"), logits(model, "peft_cat"), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize(
    "method, options",
    [("sum", {}), ("ties", {"density": 0.5}), ("tsv", {}), ("svd", {"rank": 3})],
)
def test_equals_compose_from_disk(tiny_model, tmp_path, method, options):
    """The in-memory result == `lorasum.compose` of the same adapters from disk, ΔW per
    module (the same fp32 factors and scales into the same merge: rtol 1e-6, atol 1e-7)."""
    paths = two_adapters(tiny_model, tmp_path)
    weights = [0.7, -0.3]
    lorasum.compose(paths, tmp_path / "out", weights=weights, method=method, **options)
    on_disk = read_adapter(tmp_path / "out").modules
    expected = {m: f.scale * f.B.double() @ f.A.double() for m, f in on_disk.items()}
    model = load_peft(tiny_model, paths)
    lorasum.add_weighted_adapter(model, ["a", "b"], weights, method=method, **options)
    assert model.peft_config["composed"].r == next(iter(on_disk.values())).rank
    assert_deltas_equal(new_deltas(model, "composed"), expected, rtol=1e-6, atol=1e-7)


def adapter_state(model, names) -> dict[str, torch.Tensor]:
    return {
        k: v.detach().clone()
        for k, v in model.named_parameters()
        if any(f".{n}." in k for n in names)
    }


def test_other_adapters_untouched(tiny_model, tmp_path):
    """The sources' weights are bitwise equal and their configs equal after composing."""
    model = load_peft(tiny_model, two_adapters(tiny_model, tmp_path))
    before = adapter_state(model, "ab")
    configs = {n: model.peft_config[n].to_dict() for n in "ab"}
    assert before
    lorasum.add_weighted_adapter(model, ["a", "b"], method="ties", density=0.3)
    after = adapter_state(model, "ab")
    assert sorted(after) == sorted(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert {n: model.peft_config[n].to_dict() for n in "ab"} == configs


def dora_adapter(model_dir: Path, out: Path) -> Path:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=2,
        target_modules=["q_proj"],
        use_dora=True,
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    get_peft_model(load_tiny(model_dir), config).save_pretrained(out)
    return out


def snapshot(model) -> tuple:
    """Everything a refused call must leave alone: configs, active adapter, parameters."""
    params = {k: (v.detach().clone(), v.requires_grad) for k, v in model.named_parameters()}
    configs = getattr(model, "peft_config", {})
    return list(configs), getattr(model, "active_adapter", None), params


def assert_unchanged(model, before: tuple) -> None:
    keys, active, params = snapshot(model)
    assert (keys, active) == before[:2]
    assert sorted(params) == sorted(before[2])
    for k, (value, grad) in params.items():
        assert torch.equal(value, before[2][k][0]) and grad == before[2][k][1], k


BAD_CALLS = [
    # (case, args, kwargs, words the message must contain)
    ("unknown adapter", (["a", "x"],), {}, "'x' is not loaded"),
    ("name taken", (["a", "b"],), {"adapter_name": "b"}, "already taken"),
    ("empty list", ([],), {}, "at least one"),
    ("bare string", ("a",), {}, "list of adapter names"),
    ("wrong weight count", (["a", "b"], [1.0]), {}, "weights has 1 values for 2 adapters"),
    ("non-finite weight", (["a", "b"], [1.0, float("nan")]), {}, "finite"),
    ("calibration method", (["a", "b"],), {"method": "regmean"}, "needs calibration data"),
    ("unknown method", (["a", "b"],), {"method": "nope"}, "unknown merge method"),
    ("unknown option", (["a", "b"],), {"foo": 1}, "unknown method option foo"),
    ("option of another method", (["a", "b"],), {"density": 0.5}, "density does not apply to sum"),
    ("required option missing", (["a", "b"],), {"method": "svd"}, "svd needs rank K"),
    ("weights for mean", (["a", "b"], [1, 2]), {"method": "mean"}, "1/N"),
    ("dora adapter", (["a", "dora"],), {}, "DoRA"),
]


@pytest.mark.parametrize("case, args, kwargs, words", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_arguments_refused_model_unchanged(tiny_llama, tmp_path, case, args, kwargs, words):
    model = load_peft(tiny_llama, two_adapters(tiny_llama, tmp_path))
    if case == "dora adapter":
        model.load_adapter(str(dora_adapter(tiny_llama, tmp_path / "dora")), adapter_name="dora")
    before = snapshot(model)
    with pytest.raises(LorasumError) as e:
        lorasum.add_weighted_adapter(model, *args, **kwargs)
    message = str(e.value)
    assert words in message and "\n" not in message, message
    assert_unchanged(model, before)


def test_non_peft_model_and_non_lora_type_refused(tiny_llama, tmp_path):
    from peft import LoHaConfig, get_peft_model

    base = load_tiny(tiny_llama)
    before = snapshot(base)
    with pytest.raises(LorasumError, match="needs a peft.PeftModel, got LlamaForCausalLM"):
        lorasum.add_weighted_adapter(base, ["default"])
    assert_unchanged(base, before)
    loha = get_peft_model(load_tiny(tiny_llama), LoHaConfig(r=2, target_modules=["q_proj"]))
    before = snapshot(loha)
    with pytest.raises(LorasumError, match="'default' is a LOHA adapter, not LoRA"):
        lorasum.add_weighted_adapter(loha, ["default"])
    assert_unchanged(loha, before)


def test_merged_model_refused(tiny_llama, tmp_path):
    """Adapters merged into the weights: set_adapter would unmerge them, so refuse first."""
    model = load_peft(tiny_llama, two_adapters(tiny_llama, tmp_path))
    model.merge_adapter()
    before = snapshot(model)
    with pytest.raises(LorasumError, match="unmerge_adapter"):
        lorasum.add_weighted_adapter(model, ["a", "b"])
    assert_unchanged(model, before)


def test_failed_copy_removes_the_new_adapter(tiny_llama, tmp_path, monkeypatch):
    """A failure after add_adapter (a bug, not a user mistake) deletes the half-added adapter."""
    import lorasum.peft_live

    def broken(*args):
        raise RuntimeError("copy failed")

    model = load_peft(tiny_llama, two_adapters(tiny_llama, tmp_path))
    before = snapshot(model)
    monkeypatch.setattr(lorasum.peft_live, "_copy_factors", broken)
    with pytest.raises(RuntimeError, match="copy failed"):
        lorasum.add_weighted_adapter(model, ["a", "b"])
    assert_unchanged(model, before)
    assert not any("composed" in k for k, _ in model.named_modules())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_bf16_base_on_device(tiny_llama, tmp_path, device):
    """A bf16 base on CPU or GPU: the new adapter lives where the sources do, in their dtype,
    and is still the exact sum (rtol 1e-5, atol 1e-6: the adapters stay fp32 in PEFT)."""
    from peft import PeftModel

    paths = two_adapters(tiny_llama, tmp_path)
    base = load_tiny(tiny_llama).to(device=device, dtype=torch.bfloat16)
    model = PeftModel.from_pretrained(base, str(paths[0]), adapter_name="a")
    model.load_adapter(str(paths[1]), adapter_name="b")
    expected = dense_sum(model, ["a", "b"], [1.0, -0.5])
    lorasum.add_weighted_adapter(model, ["a", "b"], [1.0, -0.5])
    source = lora_layers(model)["model.layers.0.self_attn.q_proj"].lora_A["a"].weight
    for layer in lora_layers(model).values():
        A = layer.lora_A["composed"].weight
        assert (A.device, A.dtype) == (source.device, source.dtype)
    assert_deltas_equal(new_deltas(model, "composed"), expected, rtol=1e-5, atol=1e-6)
