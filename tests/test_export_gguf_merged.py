"""`lorasum export --merged`: the base GGUF with ΔW baked in, read back with GGUFReader."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import load_tiny, make_adapter
from test_export_gguf import hf_rows, peft_deltas

from lorasum.errors import LorasumError
from lorasum.export import export_merged

# Base tensor type per llama module of the synthetic base file: every kind the merge meets.
# IQ4_NL: a type gguf.quants can read but not write (the merged weight falls back to F32).
BASE_TYPES = {
    "q_proj": "Q4_1",
    "k_proj": "Q8_0",
    "v_proj": "F16",
    "o_proj": "F32",
    "down_proj": "IQ4_NL",
    "up_proj": "Q4_1",  # not adapted: copied byte for byte
}
# Relative error of the stored W + ΔW per type (4-bit blocks of 32: about 1/15 of the range).
STEP = {"Q4_1": 0.15, "Q8_0": 0.01, "F16": 1e-3, "F32": 1e-7}


def iq4_nl_bytes(rows: int, cols: int, rng) -> np.ndarray:
    """Valid IQ4_NL blocks (an f16 scale, 16 bytes of nibbles per 32 weights): (rows, bytes)."""
    blocks = rows * cols // 32
    scale = np.full((blocks, 1), 0.01, dtype=np.float16).view(np.uint8)  # (blocks, 2)
    nibbles = rng.integers(0, 256, size=(blocks, 16), dtype=np.uint8)
    return np.concatenate([scale, nibbles], axis=1).reshape(rows, -1)


def write_base_gguf(model_dir, path) -> dict[str, np.ndarray]:
    """A llama base GGUF of the tiny model's layer weights in the types of BASE_TYPES (plus an
    F32 norm and the KV fields llama.cpp needs); returns each tensor's dequantised W."""
    import gguf
    from gguf import GGMLQuantizationType, GGUFWriter, quants

    model = load_tiny(model_dir)
    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_token_list(["<a>", "<b>", "c"])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name("tiny base")
    rng = np.random.default_rng(0)
    weights = {}
    for hf_name, p in model.named_parameters():
        kind = hf_name.split(".")[-2]
        if kind not in BASE_TYPES and "layernorm" not in hf_name:
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight",))
        W = p.detach().float().numpy()  # (d_out, d_in)
        qtype = GGMLQuantizationType[BASE_TYPES.get(kind, "F32")]
        if qtype == GGMLQuantizationType.IQ4_NL:
            data = iq4_nl_bytes(*W.shape, rng)
        elif qtype == GGMLQuantizationType.F16:
            data = W.astype(np.float16)
        else:
            data = quants.quantize(W, qtype) if qtype != GGMLQuantizationType.F32 else W
        writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)
        weights[name] = quants.dequantize(data, qtype).reshape(W.shape).astype(np.float64)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return weights


def read_tensors(path):
    from gguf import GGUFReader, quants

    reader = GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {}
    for t in reader.tensors:
        shape = tuple(int(n) for n in t.shape[::-1])
        W = quants.dequantize(t.data, t.tensor_type).astype(np.float64).reshape(shape)
        tensors[t.name] = (t.tensor_type.name, W, np.array(t.data, copy=True))
    return fields, tensors


def hf_module(gguf_name: str, n_blocks: int) -> str:
    block = gguf_name.split(".")[1]
    kind = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj"}
    kind |= {"attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj"}
    kind |= {"ffn_down": "mlp.down_proj"}
    return f"model.layers.{block}.{kind[gguf_name.split('.')[2]]}"


@pytest.fixture
def base_and_adapter(tiny_llama, tmp_path):
    base = tmp_path / "base.gguf"
    weights = write_base_gguf(tiny_llama, base)
    adapter = make_adapter(tiny_llama, tmp_path / "a", r=4, alpha=6.0)
    return base, weights, adapter


def test_merged_f32_is_w_plus_delta(tiny_llama, base_and_adapter, tmp_path):
    """f32: every adapted tensor read back minus the base's W is PEFT's ΔW (rows in HF order);
    KV fields and the tensors the adapter does not touch are the base's."""
    base, weights, adapter = base_and_adapter
    config = load_tiny(tiny_llama).config
    out = tmp_path / "m" / "merged.gguf"
    info = export_merged(adapter, out, outtype="f32", base_gguf=base)
    fields, tensors = read_tensors(out)
    _, base_tensors = read_tensors(base)
    assert fields["general.architecture"] == "llama" and fields["general.type"] == "model"
    assert fields["tokenizer.ggml.tokens"] == ["<a>", "<b>", "c"]
    assert fields["llama.attention.head_count_kv"] == config.num_key_value_heads
    expected = peft_deltas(tiny_llama, adapter)
    merged = [n for n in tensors if n.split(".")[2] in ("attn_q", "attn_k", "attn_v")]
    merged += [n for n in tensors if n.split(".")[2] in ("attn_output", "ffn_down")]
    assert info["merged_tensors"] == len(merged) == len(expected)
    for name in merged:
        qtype, W, _ = tensors[name]
        assert qtype == "F32"
        delta = hf_rows(W - weights[name], name, config).double()
        want = expected[hf_module(name, config.num_hidden_layers)]
        assert want.abs().max() > 0
        assert float((delta - want).norm() / want.norm()) < 1e-5, name
    for name, (qtype, _, raw) in tensors.items():
        if name not in merged:  # norms and ffn_up: the base's bytes
            assert qtype == base_tensors[name][0] and np.array_equal(raw, base_tensors[name][2])


def test_merged_base_types_are_requantised_w_plus_delta(tiny_llama, base_and_adapter, tmp_path):
    """outtype base: each merged weight keeps its base type where gguf can write it (IQ4_NL
    cannot: F32), equals W + ΔW within that type's step, and the stated error is measured."""
    base, weights, adapter = base_and_adapter
    config = load_tiny(tiny_llama).config
    out = tmp_path / "m" / "merged.gguf"
    info = export_merged(adapter, out, base_gguf=base)
    _, tensors = read_tensors(out)
    expected = peft_deltas(tiny_llama, adapter)
    kinds = {"attn_q": "q_proj", "attn_k": "k_proj", "attn_v": "v_proj"}
    kinds |= {"attn_output": "o_proj", "ffn_down": "down_proj"}
    assert sorted(info["f32_fallback"]) == sorted(n for n in tensors if "ffn_down" in n)
    for name, stated in info["tensors"].items():
        qtype, W, _ = tensors[name]
        base_type = BASE_TYPES[kinds[name.split(".")[2]]]
        assert qtype == ("F32" if base_type == "IQ4_NL" else base_type) == stated["type"]
        want_delta = expected[hf_module(name, config.num_hidden_layers)]
        delta = hf_rows(W - weights[name], name, config).double()
        target = delta - want_delta  # the error the stored weight adds, in HF row order
        err = float(target.norm() / want_delta.norm())
        assert err == pytest.approx(
            stated["requant_error"], rel=1e-3, abs=1e-6
        )  # ΔW fp32 vs PEFT float64
        full = np.linalg.norm(weights[name]) + float(want_delta.norm())
        assert float(target.norm()) <= STEP[qtype] * full, name
    assert info["requant_error_max"] > 0  # Q4_1 adds noise: stated, not hidden


def test_merged_refusals(tiny_llama, base_and_adapter, tmp_path):
    base, _, adapter = base_and_adapter
    with pytest.raises(LorasumError, match="--outtype"):
        export_merged(adapter, tmp_path / "m.gguf", outtype="q8_0", base_gguf=base)
    with pytest.raises(LorasumError, match="no GGUF file"):
        export_merged(adapter, tmp_path / "m.gguf")  # a transformers base: no GGUF known
    other = make_adapter(tiny_llama, tmp_path / "b", targets=["gate_proj"])
    with pytest.raises(LorasumError, match="another base model"):
        export_merged(other, tmp_path / "m.gguf", base_gguf=base)  # ffn_gate not in the file


def test_cli_export_merged(base_and_adapter, tmp_path, capsys):
    from lorasum.cli import main

    base, _, adapter = base_and_adapter
    out = tmp_path / "x" / "merged.gguf"
    args = ["export", str(adapter), "--merged", "--out", str(out), "--base-gguf", str(base)]
    assert main(args) == 0
    assert "merged GGUF model written to" in capsys.readouterr().out
    assert (out.parent / "Modelfile").read_text() == f"FROM {out.resolve()}\n"
    assert "sha256" in (out.parent / "README.md").read_text()
    assert (
        main(["export", str(adapter), "--out", str(tmp_path / "a.gguf"), "--outtype", "base"]) == 2
    )
