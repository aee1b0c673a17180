"""LoRA factors → a GGUF LoRA adapter that llama.cpp (and Ollama, LM Studio) load.

The format llama.cpp reads (its convert_lora_to_gguf.py writes it, llama-adapter.cpp loads it):

- KV: ``general.architecture`` (the base model's), ``general.type = adapter``,
  ``adapter.type = lora``, ``adapter.lora.alpha`` (float32). llama.cpp scales every module by
  alpha / rank, the rank read from the module's own tensors.
- Tensors, per adapted weight ``<base>`` (a GGUF base tensor name such as
  ``blk.3.attn_q.weight``, from the ``gguf`` package's HF→GGUF name map):
  ``<base>.lora_a`` numpy (r, d_in) = GGUF ne [d_in, r] and ``<base>.lora_b`` numpy (d_out, r)
  = ne [r, d_out], so that ΔW (d_out, d_in) = lora_b @ lora_a · alpha / r.

ΔW is in the orientation of the GGUF base tensor. That is nn.Linear's (d_out, d_in) for every
architecture (llama.cpp's converter transposes GPT-2's Conv1D weights, and PEFT already keeps
Conv1D LoRA factors in Linear orientation), except where the converter reorders rows: for
``llama`` it interleaves the two rotary halves of every head in attn_q / attn_k, so lora_b's
rows get the same permutation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lorasum.errors import LorasumError
from lorasum.factors import LoraFactors

OUTTYPES = ("f32", "f16", "q8_0")

# Architectures whose tensor row layout in llama.cpp's converter is known here: the base
# tensors that get their rows permuted for rotary embeddings (llama: HF's rotate-half halves
# interleaved per head). Other architectures are refused rather than exported with a
# possibly wrong layout.
ROTARY_PERMUTED: dict[str, tuple[str, ...]] = {
    "llama": ("attn_q", "attn_k"),
    "gpt2": (),
    "qwen2": (),
    "qwen3": (),
}
# HF model_type whose llama.cpp architecture has another name (llama.cpp converts Mistral as llama).
_ARCH_OF_MODEL_TYPE = {"mistral": "llama"}


@dataclass(frozen=True)
class GgufBase:
    """What the export needs to know of the base model llama.cpp will run."""

    arch: str  # llama.cpp architecture name, e.g. "llama"
    n_blocks: int  # transformer blocks (for the name map)
    n_head: int | None = None  # attention heads (rotary permutation of attn_q)
    n_head_kv: int | None = None  # key/value heads (rotary permutation of attn_k)
    path: Path | None = None  # the base GGUF file, when known
    shapes: Mapping[str, tuple[int, int]] | None = None  # GGUF tensor → (d_out, d_in)


def _field(reader, key: str):
    field = reader.get_field(key)
    return None if field is None else field.contents()


def base_from_gguf(path: str | Path) -> GgufBase:
    """Architecture, block and head counts, and 2-D tensor shapes of a base GGUF file."""
    from gguf import GGUFReader

    path = Path(path)
    try:
        reader = GGUFReader(str(path))
    except (OSError, ValueError) as e:
        raise LorasumError(
            f"cannot read base GGUF {path} ({str(e)[:120]}); pass a .gguf model"
        ) from None
    arch = _field(reader, "general.architecture")
    if _field(reader, "general.type") == "adapter" or arch is None:
        raise LorasumError(f"{path} is not a GGUF model file; pass the base model's .gguf")
    shapes = {
        t.name: (int(t.shape[1]), int(t.shape[0]))  # ne [d_in, d_out] → (d_out, d_in)
        for t in reader.tensors
        if len(t.shape) == 2
    }
    return GgufBase(
        arch=arch,
        n_blocks=int(_field(reader, f"{arch}.block_count") or 0),
        n_head=_field(reader, f"{arch}.attention.head_count"),
        n_head_kv=_field(reader, f"{arch}.attention.head_count_kv"),
        path=path,
        shapes=shapes,
    )


def base_from_hf_config(config) -> GgufBase:
    """The llama.cpp view of a transformers config (no base GGUF file known)."""
    model_type = getattr(config, "model_type", None)
    arch = _ARCH_OF_MODEL_TYPE.get(model_type, model_type)
    n_head = getattr(config, "num_attention_heads", None)
    return GgufBase(
        arch=arch,
        n_blocks=int(getattr(config, "num_hidden_layers", 0)),
        n_head=n_head,
        n_head_kv=getattr(config, "num_key_value_heads", None) or n_head,
    )


def _name_map(base: GgufBase):
    """The gguf package's HF→GGUF tensor name map for the base's architecture."""
    import gguf

    arches = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}
    if base.arch not in arches or base.arch not in ROTARY_PERMUTED:
        known = ", ".join(sorted(ROTARY_PERMUTED))
        raise LorasumError(
            f"cannot export a GGUF LoRA for architecture {base.arch!r} (supported: {known}); "
            "convert it with llama.cpp's convert_lora_to_gguf.py"
        )
    return gguf.get_tensor_name_map(arches[base.arch], base.n_blocks)


def file_alpha(modules: Mapping[str, LoraFactors]) -> float:
    """``adapter.lora.alpha`` for the file: scale·rank when every module shares it (a PEFT
    adapter's lora_alpha, a composed adapter's rank), else the largest rank; what a module's
    own scale·rank differs by is folded into its A (see ``lora_tensors``)."""
    products = [f.scale * f.rank for f in modules.values()]
    first = products[0]
    if first > 0 and all(math.isclose(p, first, rel_tol=1e-12) for p in products):
        return float(first)
    return float(max(f.rank for f in modules.values()))


def rotary_permute_rows(B: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's row order for a llama attn_q/attn_k weight: within each head, HF's
    rotate-half layout (first half, second half) becomes interleaved pairs.

    B: (d_out, r) with d_out = n_head · head_dim → (d_out, r), rows reordered."""
    d_out, r = B.shape
    head_dim = d_out // n_head
    halves = B.reshape(n_head, 2, head_dim // 2, r)  # (head, half, i, r)
    return halves.transpose(1, 2).reshape(d_out, r)  # row h·hd + 2i + half


def lora_tensors(
    modules: Mapping[str, LoraFactors], base: GgufBase
) -> tuple[dict[str, torch.Tensor], float]:
    """GGUF tensors {"<base>.lora_a": (r, d_in), "<base>.lora_b": (d_out, r)} and the file's
    alpha, such that lora_b @ lora_a · alpha / r == the module's ΔW in llama.cpp's layout.

    A module the name map cannot place, or whose shape differs from the base GGUF's tensor,
    is refused with one line naming it."""
    name_map = _name_map(base)
    alpha = file_alpha(modules)
    permuted = ROTARY_PERMUTED[base.arch]
    tensors: dict[str, torch.Tensor] = {}
    for module, f in sorted(modules.items()):
        name = name_map.get_name(module + ".weight", try_suffixes=(".weight",))
        if name is None:
            raise LorasumError(
                f"module {module} has no GGUF tensor name for architecture {base.arch!r} in the "
                "gguf package's name map; llama.cpp cannot apply a LoRA there: export an "
                "adapter without it"
            )
        if base.shapes is not None and base.shapes.get(name) != f.shape:
            found = base.shapes.get(name)
            raise LorasumError(
                f"module {module} has ΔW {f.shape} but the base GGUF {base.path} has "
                f"{name} {found or 'missing'}; the adapter belongs to another base model: "
                "pass that model's GGUF with --base-gguf"
            )
        A = f.A.float() * (f.scale * f.rank / alpha)  # (r, d_in): llama.cpp multiplies α/r
        B = f.B.float()  # (d_out, r)
        if name.split(".")[-2] in permuted:
            if not base.n_head:
                raise LorasumError(f"the base model's head count is unknown; cannot place {module}")
            kv = name.split(".")[-2] == "attn_k"
            B = rotary_permute_rows(B, (base.n_head_kv or base.n_head) if kv else base.n_head)
        tensors[name + ".lora_a"] = A.contiguous()
        tensors[name + ".lora_b"] = B.contiguous()
    return tensors, alpha


def encode(t: torch.Tensor, outtype: str):
    """A tensor as GGUF data: (numpy array, GGMLQuantizationType). q8_0 needs rows that are a
    multiple of its block size (32); other rows (e.g. lora_b of a rank-8 adapter) become f16,
    as llama.cpp's converter does."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

    data = t.detach().float().numpy()
    if outtype == "q8_0":
        block = GGML_QUANT_SIZES[GGMLQuantizationType.Q8_0][0]
        if data.shape[-1] % block == 0:
            q = GGMLQuantizationType.Q8_0
            return quants.quantize(data, q), q
        outtype = "f16"
    if outtype == "f16":
        return data.astype(np.float16), GGMLQuantizationType.F16
    if outtype == "f32":
        return data, GGMLQuantizationType.F32
    raise LorasumError(f"unknown --outtype {outtype!r}; use one of {', '.join(OUTTYPES)}")


def write_gguf_lora(
    path: Path,
    tensors: Mapping[str, torch.Tensor],
    arch: str,
    alpha: float,
    outtype: str = "f32",
    name: str | None = None,
) -> dict[str, str]:
    """Write the adapter file (at ``path``, which the caller makes atomic); returns each
    tensor's GGML type name."""
    from gguf import GGUFType, GGUFWriter, Keys

    encoded = {n: encode(t, outtype) for n, t in tensors.items()}  # checks outtype first
    writer = GGUFWriter(str(path), arch)
    writer.add_type(GGUFType.ADAPTER)
    writer.add_string(Keys.Adapter.TYPE, "lora")
    writer.add_float32(Keys.Adapter.LORA_ALPHA, float(alpha))
    if name:
        writer.add_name(name)
    for tensor_name, (data, qtype) in encoded.items():
        writer.add_tensor(tensor_name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {n: q.name for n, (_, q) in encoded.items()}
