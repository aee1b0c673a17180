"""GGUF LoRA export: read back with the gguf package's reader, ΔW equal to PEFT's."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import load_tiny, make_adapter

from lorasum.adapters import write_adapter
from lorasum.errors import LorasumError
from lorasum.export import export_adapter
from lorasum.factors import LoraFactors

# Relative Frobenius error of ΔW read back, per output type (f16: 11-bit mantissa, q8_0:
# 8-bit blocks of 32 for lora_a; lora_b rows of a small rank stay f16).
TOLERANCE = {"f32": 1e-6, "f16": 2e-3, "q8_0": 2e-2}


def read_gguf(path):
    """(KV fields, {base tensor name: (A (r, d_in), B (d_out, r))}) of a GGUF LoRA file."""
    from gguf import GGUFReader, quants

    reader = GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for t in reader.tensors:
        base, _, part = t.name.rpartition(".")
        data = quants.dequantize(t.data, t.tensor_type).astype(np.float64)
        pairs.setdefault(base, {})[part] = data.reshape(tuple(int(n) for n in t.shape[::-1]))
    return fields, {n: (p["lora_a"], p["lora_b"]) for n, p in pairs.items()}


def peft_deltas(model_dir, adapter_dir) -> dict[str, torch.Tensor]:
    """The oracle: PEFT's own ΔW per module, in nn.Linear orientation (d_out, d_in)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_tiny(model_dir), str(adapter_dir))
    out = {}
    for name, module in model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            d = module.get_delta_weight("default").detach().double()
            out[name] = d.T if module.fan_in_fan_out else d
    return out


def hf_rows(delta: np.ndarray, gguf_name: str, config) -> torch.Tensor:
    """A ΔW read from the file with its rows back in HF's order: transformers' own GGUF loader
    undoes llama.cpp's rotary permutation of llama's attn_q/attn_k rows (oracle for ours)."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    kind = gguf_name.split(".")[-2]
    if config.model_type == "llama" and kind in ("attn_q", "attn_k"):
        n_kv = config.num_key_value_heads if kind == "attn_k" else config.num_attention_heads
        processor = LlamaTensorProcessor()
        delta = processor._reverse_permute_weights(delta, config.num_attention_heads, n_kv)
    return torch.from_numpy(np.ascontiguousarray(delta))


def hf_names_of(gguf_base: str, arch: str, n_blocks: int) -> set[str]:
    """Every HF module name the gguf package maps onto a GGUF tensor name."""
    import gguf

    arches = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
    mapping = gguf.get_tensor_name_map(arches[arch], n_blocks).mapping
    return {k for k, (_, name) in mapping.items() if name == gguf_base.removesuffix(".weight")}


def check_file(path, model_dir, adapter_dir, outtype):
    """The file holds the adapter: KV fields, names via the name map, ΔW == PEFT's."""
    config = load_tiny(model_dir).config
    fields, pairs = read_gguf(path)
    assert fields["general.type"] == "adapter"
    assert fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == config.model_type
    alpha = fields["adapter.lora.alpha"]
    expected = peft_deltas(model_dir, adapter_dir)
    assert len(pairs) == len(expected)
    for name, (A, B) in pairs.items():
        modules = hf_names_of(name, config.model_type, config.num_hidden_layers) & set(expected)
        assert len(modules) == 1, name
        module = modules.pop()
        rank = A.shape[0]
        assert B.shape[1] == rank
        got = hf_rows(B @ A * (alpha / rank), name, config)  # what llama.cpp adds: (d_out, d_in)
        want = expected[module]
        assert want.abs().max() > 0
        err = (got - want).norm() / want.norm()
        assert err < TOLERANCE[outtype], (module, outtype, float(err))


@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0"])
def test_export_round_trip(tiny_model, tmp_path, outtype):
    is_gpt2 = "gpt2" in tiny_model.name
    targets = ["c_attn", "c_proj", "c_fc"] if is_gpt2 else None
    adapter = make_adapter(tiny_model, tmp_path / "a", r=4, alpha=6.0, targets=targets)
    out = tmp_path / "gguf" / "a.gguf"
    info = export_adapter(adapter, out, outtype=outtype)
    check_file(out, tiny_model, adapter, outtype)
    assert info["tensor_types"]
    modelfile = (out.parent / "Modelfile").read_text()
    assert f"ADAPTER {out.resolve()}" in modelfile
    card = (out.parent / "README.md").read_text()
    assert f"--lora {out.resolve()}" in card and "llama-export-lora" in card


def test_rslora_and_rank_pattern_scales_fold_into_the_file(tiny_llama, tmp_path):
    """Modules with different rank and scale: one file alpha, the rest folded into A."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    config = LoraConfig(
        r=4,
        lora_alpha=5.0,
        rank_pattern={"q_proj": 2},
        alpha_pattern={"v_proj": 11.0},
        use_rslora=True,
        target_modules=["q_proj", "v_proj", "down_proj"],
        init_lora_weights=False,
        base_model_name_or_path=str(tiny_llama),
    )
    get_peft_model(load_tiny(tiny_llama), config).save_pretrained(tmp_path / "a")
    export_adapter(tmp_path / "a", tmp_path / "a.gguf")
    check_file(tmp_path / "a.gguf", tiny_llama, tmp_path / "a", "f32")


def test_composed_sum_exports_as_one_adapter(tiny_llama, tmp_path):
    """compose --format gguf: the file's ΔW is the sum of the inputs' ΔW."""
    from lorasum.compose import compose

    a = make_adapter(tiny_llama, tmp_path / "a", r=2, alpha=4.0, seed=1)
    b = make_adapter(tiny_llama, tmp_path / "b", r=4, alpha=2.0, seed=2, targets=["q_proj"])
    compose([a, b], tmp_path / "sum", weights=[1.0, -0.5], format="gguf")
    fields, pairs = read_gguf(tmp_path / "sum" / "gguf" / "adapter.gguf")
    da, db = peft_deltas(tiny_llama, a), peft_deltas(tiny_llama, b)
    config = load_tiny(tiny_llama).config
    assert fields["adapter.lora.alpha"] == 6.0  # the composed rank, scale 1
    for name, (A, B) in pairs.items():
        (module,) = hf_names_of(name, "llama", 2) & set(da)
        want = da[module] - 0.5 * db.get(module, torch.zeros_like(da[module]))
        got = hf_rows(B @ A * (fields["adapter.lora.alpha"] / A.shape[0]), name, config)
        assert (got - want).norm() / want.norm() < 1e-6


def test_unmappable_module_is_refused_by_name(tiny_llama, tmp_path):
    g = torch.Generator().manual_seed(0)
    module = "model.layers.0.self_attn.q_proj_extra"
    f = LoraFactors(A=torch.randn(2, 64, generator=g), B=torch.randn(64, 2, generator=g), scale=1)
    (tmp_path / "a").mkdir()
    write_adapter(tmp_path / "a", {module: f}, str(tiny_llama))
    with pytest.raises(LorasumError, match=module.replace(".", r"\.")):
        export_adapter(tmp_path / "a", tmp_path / "a.gguf")
    assert not (tmp_path / "a.gguf").exists()


def test_unknown_architecture_is_refused(tiny_gpt2, tmp_path):
    from transformers import OPTConfig

    OPTConfig(num_hidden_layers=2).save_pretrained(tmp_path / "opt")
    adapter = make_adapter(tiny_gpt2, tmp_path / "a")
    with pytest.raises(LorasumError, match="architecture 'opt'"):
        export_adapter(adapter, tmp_path / "a.gguf", model=str(tmp_path / "opt"))


def test_dora_and_bad_options_are_refused(tiny_llama, tmp_path):
    adapter = make_adapter(tiny_llama, tmp_path / "a")
    with pytest.raises(LorasumError, match="outtype"):
        export_adapter(adapter, tmp_path / "a.gguf", outtype="q4_0")
    with pytest.raises(LorasumError, match=r"\.gguf"):
        export_adapter(adapter, tmp_path / "a.bin")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(LorasumError, match="DoRA"):
        export_adapter(adapter, tmp_path / "a.gguf")


def test_foreign_files_beside_the_output_are_kept(tiny_llama, tmp_path):
    adapter = make_adapter(tiny_llama, tmp_path / "a")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "README.md").write_text("someone's notes")
    with pytest.raises(LorasumError, match="README.md exists"):
        export_adapter(adapter, tmp_path / "out" / "a.gguf")
    export_adapter(adapter, tmp_path / "fresh" / "a.gguf")
    export_adapter(adapter, tmp_path / "fresh" / "a.gguf", outtype="f16")  # ours: replaced


def _embedded_gguf():
    from lorasum.models import embedded_gguf_path

    try:
        return embedded_gguf_path(check=False)
    except LorasumError:
        pytest.skip("the embedded model package is not installed")


def test_default_model_export_names_the_embedded_gguf(tmp_path):
    """An adapter of the default model: base GGUF path and sha256 in the card and Modelfile;
    its shapes are checked against the GGUF's tensors."""
    from lorasum.models import EMBEDDED_SHA256

    base = _embedded_gguf()
    g = torch.Generator().manual_seed(0)
    modules = {
        "model.layers.0.self_attn.k_proj": LoraFactors(
            A=torch.randn(2, 576, generator=g), B=torch.randn(192, 2, generator=g), scale=2.0
        )
    }
    (tmp_path / "a").mkdir()
    write_adapter(tmp_path / "a", modules, "default")
    info = export_adapter(tmp_path / "a", tmp_path / "out" / "a.gguf")
    assert info["base_gguf_sha256"] == EMBEDDED_SHA256
    assert f"FROM {base.resolve()}" in (tmp_path / "out" / "Modelfile").read_text()
    card = (tmp_path / "out" / "README.md").read_text()
    assert EMBEDDED_SHA256 in card and f"-m {base.resolve()}" in card


def test_adapter_of_another_base_is_refused(tiny_llama, tmp_path):
    base = _embedded_gguf()
    adapter = make_adapter(tiny_llama, tmp_path / "a")
    with pytest.raises(LorasumError, match="another base model"):
        export_adapter(adapter, tmp_path / "a.gguf", base_gguf=base)


def test_cli_export_and_compose_gguf(tiny_gpt2, tmp_path, capsys):
    from lorasum.cli import main

    a = make_adapter(tiny_gpt2, tmp_path / "a", seed=1)
    b = make_adapter(tiny_gpt2, tmp_path / "b", seed=2)
    assert (
        main(["export", str(a), "--out", str(tmp_path / "x" / "a.gguf"), "--outtype", "f16"]) == 0
    )
    check_file(tmp_path / "x" / "a.gguf", tiny_gpt2, a, "f16")
    assert main(["compose", str(a), str(b), "--out", str(tmp_path / "s"), "--format", "gguf"]) == 0
    assert "GGUF LoRA written to" in capsys.readouterr().out
    check_file(tmp_path / "s" / "gguf" / "adapter.gguf", tiny_gpt2, tmp_path / "s", "f32")
    assert main(["export", str(a), "--out", str(tmp_path / "a.txt")]) == 2
