"""`lorasum export`: a PEFT LoRA adapter → a GGUF LoRA file, an Ollama Modelfile and a card."""

from __future__ import annotations

import contextlib
import os
import shlex
from pathlib import Path

from lorasum._version import __version__
from lorasum.adapters import read_adapter
from lorasum.errors import LorasumError
from lorasum.export.card import CARD_MARK, model_card, modelfile
from lorasum.export.gguf_lora import (
    OUTTYPES,
    GgufBase,
    base_from_gguf,
    base_from_hf_config,
    lora_tensors,
    write_gguf_lora,
)
from lorasum.io import atomic_write_text, commit_temp, temp_beside

MODELFILE_NAME = "Modelfile"
CARD_NAME = "README.md"


def resolve_base(model: str | None, base_gguf: str | Path | None) -> GgufBase:
    """The base llama.cpp will run: a given GGUF file, the embedded default model's GGUF,
    or (no file known) the architecture from a transformers config."""
    from lorasum.models.loading import DEFAULT_MODEL, embedded_gguf_path, resolve_model

    if base_gguf is not None:
        return base_from_gguf(base_gguf)
    if model is None:
        raise LorasumError("the adapter does not name its base model; pass --model or --base-gguf")
    if model == DEFAULT_MODEL:
        return base_from_gguf(embedded_gguf_path())
    from transformers import AutoConfig

    from lorasum.models.loading import remote_code_allowed

    try:
        config = AutoConfig.from_pretrained(
            resolve_model(model), trust_remote_code=remote_code_allowed()
        )
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LorasumError(
            f"cannot read the config of base model {model!r} ({first[:120]}); pass --model "
            "with a local model directory, or --base-gguf with its GGUF file"
        ) from None
    return base_from_hf_config(config)


def check_companions(out: Path, overwrite: bool) -> None:
    """Refuse to replace files beside the output unless a lorasum export wrote them (its
    card carries CARD_MARK) or ``overwrite``."""
    card = out.parent / CARD_NAME
    if overwrite or (card.is_file() and card.read_text(errors="replace").startswith(CARD_MARK)):
        return
    for p in (out, out.parent / MODELFILE_NAME, card):
        if p.exists():
            raise LorasumError(
                f"{p} exists; write the export to another directory or pass --overwrite"
            )


def _command(adapter: Path, out: Path, outtype: str, model: str | None, base_gguf) -> str:
    args = ["lorasum", "export", str(adapter), "--format", "gguf", "--out", str(out)]
    args += ["--outtype", outtype]
    if model is not None:
        args += ["--model", model]
    if base_gguf is not None:
        args += ["--base-gguf", str(base_gguf)]
    return shlex.join(args)


def export_adapter(
    adapter: str | Path,
    out: str | Path,
    format: str = "gguf",
    outtype: str = "f32",
    model: str | None = None,
    base_gguf: str | Path | None = None,
    overwrite: bool = False,
) -> dict:
    """Write ``adapter`` (a PEFT LoRA directory) as a GGUF LoRA adapter at ``out``, with an
    Ollama ``Modelfile`` and a ``README.md`` (llama.cpp command lines) beside it.

    The base (for the architecture, the name map, head counts and a shape check) is
    ``base_gguf``, else ``model`` or the adapter's base model: the embedded default model's
    GGUF, or a transformers config. Returns what was written (also in the card).
    """
    from lorasum.io import sha256_file
    from lorasum.models.loading import DEFAULT_MODEL, EMBEDDED_SHA256

    if format != "gguf":
        raise LorasumError(f"unknown export --format {format!r}; use gguf")
    if outtype not in OUTTYPES:
        raise LorasumError(f"unknown --outtype {outtype!r}; use one of {', '.join(OUTTYPES)}")
    out = Path(out)
    if out.suffix != ".gguf":
        raise LorasumError(f"--out {out} should be a .gguf file name")
    a = read_adapter(adapter, strict=True)
    spec = model or a.base_model
    base = resolve_base(spec, base_gguf)
    tensors, alpha = lora_tensors(a.modules, base)
    check_companions(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(out, ".gguf")
    try:
        types = write_gguf_lora(Path(tmp), tensors, base.arch, alpha, outtype, name=a.name)
        commit_temp(tmp, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    counts: dict[str, int] = {}
    for t in types.values():
        counts[t] = counts.get(t, 0) + 1
    base_sha = None
    if base.path is not None:
        embedded = spec == DEFAULT_MODEL and base_gguf is None
        base_sha = EMBEDDED_SHA256 if embedded else sha256_file(base.path)
    info = {
        "lorasum_version": __version__,
        "command": _command(a.path, out, outtype, model, base_gguf),
        "adapter": str(a.path),
        "gguf": str(out),
        "arch": base.arch,
        "alpha": alpha,
        "rank": max(f.rank for f in a.modules.values()),
        "modules": len(a.modules),
        "outtype": outtype,
        "tensor_types": counts,
        "base_model": spec,
        "base_gguf": str(base.path.resolve()) if base.path else None,
        "base_gguf_sha256": base_sha,
    }
    atomic_write_text(out.parent / MODELFILE_NAME, modelfile(base.path, out))
    atomic_write_text(out.parent / CARD_NAME, model_card(info))
    return info
