"""The ``arrow`` route: PEFT's Arrow (`create_arrow_model`) over single adapters, checked against
the adapters applied by plain PEFT, and its refusals as one line (the route in a study:
test_routing's routed study)."""

from __future__ import annotations

import pytest
import torch
from conftest import load_tiny, make_adapter

from lorasum.data import load_split, make_batches
from lorasum.data.token_cache import tokenize_cached
from lorasum.errors import LorasumError
from lorasum.evaluate import evaluate_batches
from lorasum.models import load_tokenizer
from lorasum.routing import arrow_model, arrow_options, evaluate_arrow


@pytest.fixture(autouse=True)
def _fp32(monkeypatch):
    monkeypatch.setenv("LORASUM_PRECISION", "fp32")


@pytest.fixture
def adapters(tiny_model, tmp_path):
    return tiny_model, [
        make_adapter(tiny_model, tmp_path / n, seed=i + 1) for i, n in enumerate("ab")
    ]


def _logits(net, ids):
    with torch.no_grad():
        return net(input_ids=ids).logits


def _peft_logits(model, paths, ids, scale: float = 1.0):
    """The adapters applied together by plain PEFT, each ΔW times ``scale``."""
    from peft import PeftModel

    net = PeftModel.from_pretrained(model, str(paths[0]), adapter_name="a0")
    for i, p in enumerate(paths[1:], 1):
        net.load_adapter(str(p), adapter_name=f"a{i}")
    net.base_model.set_adapter([f"a{i}" for i in range(len(paths))])
    for m in net.modules():
        if hasattr(m, "scaling") and isinstance(m.scaling, dict):
            m.scaling.update({k: v * scale for k, v in m.scaling.items()})
    try:
        return _logits(net.eval(), ids)
    finally:
        net.unload()


def test_arrow_of_one_adapter_is_that_adapter(adapters):
    """The oracle: with one adapter (or two identical ones) Arrow's softmax weight is 1 on that
    adapter, so the model is the adapter applied alone. A tall temperature makes the weights
    of two adapters ½ each: the model with ½(ΔW_a + ΔW_b)."""
    model_dir, (a, b) = adapters
    model = load_tiny(model_dir)
    ids = torch.randint(5, 50, (2, 9), generator=torch.Generator().manual_seed(0))
    alone = _peft_logits(model, [a], ids)
    base = _logits(model, ids)
    assert (alone - base).abs().max() > 1e-2  # the adapter does change the model
    for paths in ([a], [a, a]):
        net = arrow_model(model, paths)
        got = _logits(net, ids)
        net.unload()
        torch.testing.assert_close(got, alone, rtol=1e-5, atol=1e-5)
    net = arrow_model(model, [a, b], temperature=1e9)
    half = _logits(net, ids)
    net.unload()
    torch.testing.assert_close(
        half, _peft_logits(model, [a, b], ids, scale=0.5), rtol=1e-5, atol=1e-5
    )
    # at temperature 1 the mix is neither adapter alone
    net = arrow_model(model, [a, b])
    mixed = _logits(net, ids)
    net.unload()
    assert (mixed - alone).abs().max() > 1e-3
    assert not any("lora" in k for k in model.state_dict())  # the model is given back


def test_evaluate_arrow_matches_the_adapter_alone(tiny_llama, qa_files, tmp_path):
    """One domain, one adapter: evaluate_arrow's numbers are evaluate_batches' with the adapter."""
    from peft import PeftModel

    path = make_adapter(tiny_llama, tmp_path / "arith", seed=3)
    src = load_split(str(qa_files["arith"]), 42, None, None, None, 6)
    model = load_tiny(tiny_llama)
    tok = load_tokenizer(str(tiny_llama))
    got = evaluate_arrow(model, tok, {"arith": path}, {"arith": src}, 32, batch_size=4)
    net = PeftModel.from_pretrained(model, str(path))
    items = tokenize_cached(tok, [src], "test", 32)
    ref = evaluate_batches(
        net, make_batches(items, 4, tok.pad_token_id, False), ["arith"], torch.device("cpu")
    )
    net.unload()
    assert got["tokens"] == ref["tokens"]
    assert got["nll"] == pytest.approx(ref["nll"], rel=1e-5)
    assert got["routing_accuracy"] is None
    assert got["arrow"] == {"top_k": 1, "router_temperature": 1.0, "rng_seed": 0}
    # under bf16 autocast (frozen linears, LoRA factors included, held in bf16) it still runs,
    # with float32 prototypes, and lands near the float32 numbers
    bf16 = evaluate_arrow(
        model, tok, {"arith": path}, {"arith": src}, 32, batch_size=4, amp_dtype=torch.bfloat16
    )
    assert bf16["precision"] == "bf16" and bf16["tokens"] == ref["tokens"]
    assert bf16["nll"] == pytest.approx(ref["nll"], rel=0.05)


def _one_line(excinfo, *words):
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for w in words:
        assert w in msg, msg


@pytest.mark.parametrize(
    "case, kwargs, words",
    [
        ("rank", {"r": 8}, ["rank 4", "one rank"]),
        ("targets", {"targets": ["q_proj", "v_proj"]}, ["different modules"]),
        ("layers", {"layers_to_transform": [0], "alone": True}, ["every layer"]),
        ("dora", {"use_dora": True}, ["DoRA"]),
    ],
)
def test_what_arrow_refuses_is_one_line(tiny_llama, tmp_path, case, kwargs, words):
    from peft import LoraConfig, get_peft_model

    good = make_adapter(tiny_llama, tmp_path / "good", seed=1)
    model = load_tiny(tiny_llama)
    torch.manual_seed(2)
    config = LoraConfig(
        r=kwargs.get("r", 4),
        lora_alpha=8,
        target_modules=kwargs.get("targets", ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]),
        layers_to_transform=kwargs.get("layers_to_transform"),
        use_dora=kwargs.get("use_dora", False),
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    get_peft_model(load_tiny(tiny_llama), config).save_pretrained(tmp_path / case)
    with pytest.raises(LorasumError) as e:
        bad = tmp_path / case
        arrow_model(model, [bad, bad] if kwargs.get("alone") else [good, bad])
    _one_line(e, *words)
    assert not any("lora" in k for k in model.state_dict())


def test_bad_options_and_peft_refusals_are_one_line(tiny_llama, tmp_path, monkeypatch):
    with pytest.raises(LorasumError) as e:
        arrow_options(2, top_k=3, temperature=0)
    _one_line(e, "top_k 3", "temperature 0")
    # whatever PEFT itself raises becomes one line, and the model gets its base layers back
    import peft

    def refuse(model, paths, config):
        peft.PeftModel.from_pretrained(model, paths[0])  # injects LoRA layers, then fails
        raise ValueError("[task_1] something PEFT does not take\n  details")

    monkeypatch.setattr(peft, "create_arrow_model", refuse)
    a = make_adapter(tiny_llama, tmp_path / "a", seed=1)
    model = load_tiny(tiny_llama)
    with pytest.raises(LorasumError) as e:
        arrow_model(model, [a, a])
    _one_line(e, "something PEFT does not take")
    assert not any("lora" in k for k in model.state_dict())
    assert "peft_config" not in vars(model)
