"""LoRA training: it learns, writes a loadable PEFT adapter, reuses finished work, and leaves a
shared base model as it found it."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from lorasum.errors import LorasumError
from lorasum.evaluate import evaluate
from lorasum.io import read_json
from lorasum.models import load_model, load_tokenizer
from lorasum.training import TrainConfig, train

CPU = torch.device("cpu")


def _cfg(model, data, **kw) -> TrainConfig:
    base = dict(
        model=str(model),
        data=[str(d) for d in data],
        max_steps=30,
        lr=3e-3,
        batch_size=8,
        max_length=32,
        dropout=0.0,
        eval_val=False,
        warmup_steps=0,
        precision="fp32",
        device="cpu",
    )
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def trained(tiny_llama, qa_files, tmp_path_factory):
    cfg = _cfg(tiny_llama, [qa_files["arith"]])
    out = tmp_path_factory.mktemp("adapters") / "arith"
    marker = train(cfg, out, progress=False)
    return cfg, out, marker


def _ppl(model, data, adapter=None) -> float:
    return evaluate(
        model=str(model),
        data=[str(data)],
        adapter=str(adapter) if adapter else None,
        max_length=32,
        precision="fp32",
        device="cpu",
        progress=False,
    )["perplexity"]


def test_training_lowers_loss_and_test_perplexity(trained, tiny_llama, qa_files):
    _cfg_, out, marker = trained
    m = marker["metrics"]
    assert m["steps"] == 30
    assert m["train_rows"] == 48
    assert m["first_loss"] > m["final_loss"]
    base = _ppl(tiny_llama, qa_files["arith"])
    tuned = _ppl(tiny_llama, qa_files["arith"], adapter=out)
    assert tuned < base, (base, tuned)
    assert tuned < 0.8 * base  # clearly learnt, not noise


def test_adapter_files_and_peft_load(trained, tiny_llama):
    from peft import PeftModel

    cfg, out, marker = trained
    for name in ("adapter_config.json", "adapter_model.safetensors", "train_log.jsonl"):
        assert (out / name).is_file(), name
    assert read_json(out / "lorasum.json") == json.loads(json.dumps(marker, default=str))
    assert marker["kind"] == "adapter" and marker["config"]["rank"] == cfg.rank
    assert sorted(marker["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]
    )
    assert not list(out.parent.glob(".arith.*"))  # no temp dirs left beside it

    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 31))
    assert log[0]["loss"] == pytest.approx(marker["metrics"]["first_loss"])
    assert all(r["tokens"] > 0 for r in log)

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == cfg.rank and config["lora_alpha"] == cfg.alpha
    assert config["base_model_name_or_path"] == str(tiny_llama)
    assert config["fan_in_fan_out"] is False

    tensors = load_file(str(out / "adapter_model.safetensors"))
    b = [v for k, v in tensors.items() if "lora_B" in k]
    assert len(b) == 2 * 5  # 2 layers x 5 target modules
    assert all(v.abs().max() > 0 for v in b)  # trained: B moved away from its zero init

    base = load_model(str(tiny_llama), CPU)
    peft_model = PeftModel.from_pretrained(base, str(out))
    lora_names = [n for n, _ in peft_model.named_modules() if n.endswith("lora_A")]
    assert len(lora_names) == 10
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        with_adapter = peft_model(ids).logits
        with peft_model.disable_adapter():
            without = peft_model(ids).logits
    assert (with_adapter - without).abs().max() > 1e-3


def test_rerun_reuses_different_config_refuses_overwrite_retrains(tiny_llama, qa_files, tmp_path):
    cfg = _cfg(tiny_llama, [qa_files["colors"]], max_steps=3)
    out = tmp_path / "colors"
    first = train(cfg, out, progress=False)
    weights = out / "adapter_model.safetensors"
    mtime = weights.stat().st_mtime_ns

    again = train(cfg, out, progress=False)
    assert weights.stat().st_mtime_ns == mtime  # reused, not retrained
    assert again == read_json(out / "lorasum.json")
    assert again["key"] == first["key"]

    other = replace(cfg, max_steps=4)
    with pytest.raises(LorasumError, match="--overwrite"):
        train(other, out, progress=False)
    assert weights.stat().st_mtime_ns == mtime  # the refusal left it alone

    retrained = train(other, out, overwrite=True, progress=False)
    assert retrained["key"] != first["key"]
    assert read_json(out / "lorasum.json")["key"] == retrained["key"]
    assert retrained["metrics"]["steps"] == 4
    assert len((out / "train_log.jsonl").read_text().splitlines()) == 4
    assert weights.stat().st_mtime_ns != mtime

    # overwrite=True retrains even an identical config
    mtime = weights.stat().st_mtime_ns
    train(other, out, overwrite=True, progress=False)
    assert weights.stat().st_mtime_ns != mtime


def test_output_path_is_a_file(tiny_llama, qa_files, tmp_path):
    out = tmp_path / "file"
    out.write_text("x")
    with pytest.raises(LorasumError, match="is a file"):
        train(_cfg(tiny_llama, [qa_files["arith"]], max_steps=1), out, progress=False)


def test_shared_model_left_unchanged(tiny_llama, qa_files, tmp_path):
    model = load_model(str(tiny_llama), CPU)
    tok = load_tokenizer(str(tiny_llama))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names_before = [n for n, _ in model.named_modules()]

    cfg = _cfg(tiny_llama, [qa_files["finance"]], max_steps=5)
    train(cfg, tmp_path / "shared", model=model, tokenizer=tok, progress=False)

    assert not [n for n, _ in model.named_modules() if "lora_" in n]
    assert [n for n, _ in model.named_modules()] == names_before
    after = model.state_dict()
    assert list(after) == list(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), k

    # A shared model that already served one training gives the same adapter as a fresh one.
    cfg2 = _cfg(tiny_llama, [qa_files["colors"]], max_steps=5)
    train(cfg2, tmp_path / "shared2", model=model, tokenizer=tok, progress=False)
    train(cfg2, tmp_path / "fresh2", progress=False)
    shared = load_file(str(tmp_path / "shared2" / "adapter_model.safetensors"))
    fresh = load_file(str(tmp_path / "fresh2" / "adapter_model.safetensors"))
    assert shared.keys() == fresh.keys()
    for k in shared:
        torch.testing.assert_close(shared[k], fresh[k], rtol=1e-5, atol=1e-6)


def test_config_validation_collects_problems():
    with pytest.raises(LorasumError) as e:
        TrainConfig(data=["math"], rank=0, lr=-1)
    msg = str(e.value)
    assert msg.startswith("invalid training config")
    assert "--rank" in msg and "--lr" in msg

    with pytest.raises(LorasumError) as e:
        TrainConfig(data=[], dropout=1.0, precision="fp8", max_length=4)
    msg = str(e.value)
    for part in ("no data", "--dropout", "--precision", "--max-length"):
        assert part in msg, part

    with pytest.raises(LorasumError, match="repeat"):
        TrainConfig(data=["math", "math"])
    assert TrainConfig(data="math,finance").data == ["math", "finance"]


def test_identity_ignores_device_and_reporting():
    a = TrainConfig(data=["math"], device="cpu", eval_val=True)
    b = TrainConfig(data=["math"], device="cuda", eval_val=False)
    assert a.identity() == b.identity()
    assert a.identity() != TrainConfig(data=["math"], rank=8).identity()


def test_gpt2_adapter(tiny_gpt2, qa_files, tmp_path):
    from peft import PeftModel

    out = tmp_path / "gpt2"
    cfg = _cfg(tiny_gpt2, [qa_files["arith"]], max_steps=4, eval_val=True)
    marker = train(cfg, out, progress=False)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True
    assert set(config["target_modules"]) == {"c_attn", "c_proj"}
    assert marker["target_modules"] == ["c_attn", "c_proj"]
    assert marker["metrics"]["val_perplexity"] > 1

    tensors = load_file(str(out / "adapter_model.safetensors"))
    # c_attn in 2 blocks; c_proj in attention and MLP of 2 blocks: 6 modules x (A, B)
    assert len(tensors) == 12
    model = PeftModel.from_pretrained(load_model(str(tiny_gpt2), CPU), str(out))
    assert len([n for n, _ in model.named_modules() if n.endswith("lora_A")]) == 6
    # Val perplexity reported by train() matches evaluating the adapter on the val split.
    val = evaluate(
        model=str(tiny_gpt2),
        data=[str(qa_files["arith"])],
        adapter=str(out),
        split="val",
        max_length=32,
        batch_size=3,
        precision="fp32",
        device="cpu",
        progress=False,
    )
    assert val["perplexity"] == pytest.approx(marker["metrics"]["val_perplexity"], rel=1e-4)
