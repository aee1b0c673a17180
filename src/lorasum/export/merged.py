"""`lorasum export --merged --format gguf`: an adapter baked into a full GGUF model file."""

from __future__ import annotations

import contextlib
import os
import shlex
from pathlib import Path

from lorasum._version import __version__
from lorasum.adapters import read_adapter
from lorasum.errors import LorasumError
from lorasum.export.card import merged_card
from lorasum.export.gguf_lora import lora_tensors
from lorasum.export.gguf_merged import MERGED_OUTTYPES, delta_weights, write_merged_gguf
from lorasum.export.lora import CARD_NAME, MODELFILE_NAME, check_companions, resolve_base
from lorasum.io import atomic_write_text, commit_temp, temp_beside


def _command(adapter: Path, out: Path, outtype: str, model, base_gguf) -> str:
    args = ["lorasum", "export", str(adapter), "--merged", "--format", "gguf"]
    args += ["--out", str(out), "--outtype", outtype]
    if model is not None:
        args += ["--model", model]
    if base_gguf is not None:
        args += ["--base-gguf", str(base_gguf)]
    return shlex.join(args)


def export_merged(
    adapter: str | Path,
    out: str | Path,
    outtype: str = "base",
    model: str | None = None,
    base_gguf: str | Path | None = None,
    overwrite: bool = False,
) -> dict:
    """Write the base GGUF with ``adapter``'s ΔW added to every adapted weight, at ``out``
    (a full model file, no adapter needed), with a Modelfile and README.md beside it.

    ``outtype``: "base" keeps each weight's type from the base file where the gguf package
    can quantise it (else F32, listed in ``f32_fallback``); "f32"/"f16" store merged weights
    unquantised. The base is ``base_gguf`` or the embedded default model's GGUF.
    Returns what was written, with each merged tensor's requantisation error relative to ΔW.
    """
    from lorasum.io import sha256_file
    from lorasum.models.loading import DEFAULT_MODEL, EMBEDDED_SHA256

    if outtype not in MERGED_OUTTYPES:
        raise LorasumError(
            f"unknown --outtype {outtype!r} for --merged; use one of {', '.join(MERGED_OUTTYPES)}"
        )
    out = Path(out)
    if out.suffix != ".gguf":
        raise LorasumError(f"--out {out} should be a .gguf file name")
    a = read_adapter(adapter, strict=True)
    spec = model or a.base_model
    base = resolve_base(spec, base_gguf)
    if base.path is None:
        raise LorasumError(
            f"no GGUF file of base model {spec!r} is known; pass it with --base-gguf "
            "(llama.cpp's convert_hf_to_gguf.py writes one)"
        )
    tensors, alpha = lora_tensors(a.modules, base)
    check_companions(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(out, ".gguf")
    try:
        written = write_merged_gguf(Path(tmp), base.path, delta_weights(tensors, alpha), outtype)
        commit_temp(tmp, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    errors = [t["requant_error"] for t in written["tensors"].values()]
    embedded = spec == DEFAULT_MODEL and base_gguf is None
    info = {
        "lorasum_version": __version__,
        "command": _command(a.path, out, outtype, model, base_gguf),
        "adapter": str(a.path),
        "gguf": str(out),
        "arch": base.arch,
        "outtype": outtype,
        "merged_tensors": len(written["tensors"]),
        "requant_error_median": sorted(errors)[len(errors) // 2],
        "requant_error_max": max(errors),
        "f32_fallback": written["f32_fallback"],
        "tensors": written["tensors"],
        "base_model": spec,
        "base_gguf": str(base.path.resolve()),
        "base_gguf_sha256": EMBEDDED_SHA256 if embedded else sha256_file(base.path),
    }
    atomic_write_text(out.parent / MODELFILE_NAME, f"FROM {out.resolve()}\n")
    atomic_write_text(out.parent / CARD_NAME, merged_card(info))
    return info
