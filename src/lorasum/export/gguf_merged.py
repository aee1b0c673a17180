"""An adapter baked into a full GGUF model file, for servers that take no adapters.

Written from the base GGUF: every KV field and every tensor the adapter does not touch is
copied unchanged (quantised blocks byte for byte); each adapted weight W is dequantised
(`gguf.quants.dequantize`), W' = W + ΔW is formed in fp32 (ΔW in llama.cpp's layout, from the
same GGUF LoRA tensors `lora_tensors` writes), and W' is stored

- ``outtype="base"``: in the base tensor's own type where `gguf.quants.quantize` can write
  it (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, BF16, F16, F32); a type it cannot write (the K- and
  I-quants) is stored as F32 and listed in the result;
- ``outtype="f32"`` / ``"f16"``: unquantised, W + ΔW as computed (f16: rounded once).

Requantising a merged weight adds an error of the order of the base type's step to W + ΔW;
`requant_error` measures what is left of ΔW per tensor.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

MERGED_OUTTYPES = ("base", "f32", "f16")


def delta_weights(lora: Mapping[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """{GGUF base tensor name: ΔW (d_out, d_in)} from a GGUF LoRA's tensors: what llama.cpp
    adds, lora_b @ lora_a · alpha / r."""
    out = {}
    for name, A in lora.items():
        if not name.endswith(".lora_a"):
            continue
        base = name.removesuffix(".lora_a")
        B = lora[base + ".lora_b"]  # (d_out, r)
        out[base] = (B.double() @ A.double() * (alpha / A.shape[0])).float()  # (d_out, d_in)
    return out


def encode_merged(W: np.ndarray, base_type, outtype: str):
    """A merged weight (d_out, d_in) fp32 as GGUF data: (array, GGMLQuantizationType, whether
    the base type had to be replaced by F32)."""
    from gguf import GGMLQuantizationType, quants

    if outtype == "f32":
        return W, GGMLQuantizationType.F32, False
    if outtype == "f16":
        return W.astype(np.float16), GGMLQuantizationType.F16, False
    if base_type == GGMLQuantizationType.F32:
        return W, base_type, False
    if base_type == GGMLQuantizationType.F16:
        return W.astype(np.float16), base_type, False
    try:
        return quants.quantize(W, base_type), base_type, False
    except (NotImplementedError, quants.QuantError):
        return W, GGMLQuantizationType.F32, True


def requant_error(stored: np.ndarray, qtype, W: np.ndarray, delta: np.ndarray) -> float:
    """‖stored − W − ΔW‖ / ‖ΔW‖: the error writing the merged weight adds, relative to ΔW
    (0 for f32; about 1 means the requantisation noise is as large as the adapter itself)."""
    from gguf import quants

    back = quants.dequantize(stored, qtype).astype(np.float64).reshape(W.shape)
    err = back - W.astype(np.float64) - delta.astype(np.float64)
    return float(np.linalg.norm(err) / max(np.linalg.norm(delta), 1e-30))


def _copy_fields(reader, writer, file_type: int | None) -> None:
    """Every KV field of the base file (the writer adds general.architecture itself)."""
    from gguf import GGUFValueType

    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = field.contents()
        if key == "general.file_type" and file_type is not None:
            value = file_type
        vtype = field.types[0]
        sub = field.types[1] if vtype == GGUFValueType.ARRAY and len(field.types) > 1 else None
        writer.add_key_value(key, value, vtype, sub_type=sub)


def write_merged_gguf(
    path: Path, base_path: Path, deltas: Mapping[str, torch.Tensor], outtype: str = "base"
) -> dict:
    """Write ``base_path`` with ``deltas`` ({GGUF tensor name: ΔW (d_out, d_in)}) added, at
    ``path`` (the caller makes it atomic). Returns per merged tensor its stored type and
    `requant_error`, and the names whose base type had to become F32."""
    from gguf import GGUFReader, GGUFWriter, LlamaFileType, quants

    if outtype not in MERGED_OUTTYPES:
        raise ValueError(f"outtype {outtype!r} not in {MERGED_OUTTYPES}")
    reader = GGUFReader(str(base_path))
    missing = sorted(set(deltas) - {t.name for t in reader.tensors})
    if missing:
        raise ValueError(f"the base GGUF {base_path} has no tensor {missing[0]}")
    arch = reader.get_field("general.architecture").contents()
    file_type = {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16}.get(outtype)
    writer = GGUFWriter(str(path), arch)
    _copy_fields(reader, writer, None if file_type is None else int(file_type))
    merged: dict[str, dict] = {}
    fallback: list[str] = []
    for t in reader.tensors:
        if t.name not in deltas:
            writer.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
            continue
        shape = tuple(int(n) for n in t.shape[::-1])  # (d_out, d_in)
        W = quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape)
        delta = deltas[t.name].detach().float().numpy()
        stored, qtype, fell_back = encode_merged(W + delta, t.tensor_type, outtype)
        writer.add_tensor(t.name, stored, raw_shape=stored.shape, raw_dtype=qtype)
        merged[t.name] = {
            "type": qtype.name,
            "requant_error": requant_error(stored, qtype, W, delta),
        }
        if fell_back:
            fallback.append(t.name)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"tensors": merged, "f32_fallback": fallback}
