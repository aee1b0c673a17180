"""Exact composition of LoRA adapters: ΔW = Σ w_i · s_i · B_i A_i, written as one PEFT adapter.

The sum is exact (rank concatenation, no SVD): the composed adapter's rank is Σ r_i. A module
that an adapter does not adapt contributes a zero ΔW.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import torch

from lorasum import __version__
from lorasum.adapters import Adapter, check_fits, read_adapter, write_adapter
from lorasum.errors import LorasumError
from lorasum.factors import sum_factors
from lorasum.io import atomic_dir, check_output_dir, config_key, existing_key, read_json

log = logging.getLogger(__name__)


def check_compatible(adapters: Sequence[Adapter]) -> None:
    """Same base model (where recorded) and the same ΔW shape for every shared module."""
    bases = {a.base_model for a in adapters if a.base_model}
    if len(bases) > 1:
        raise LorasumError(
            f"adapters were trained on different base models ({', '.join(sorted(bases))}); "
            "compose adapters of one base model"
        )
    shapes: dict[str, tuple[tuple[int, int], Path]] = {}
    for a in adapters:
        for name, f in a.modules.items():
            if name in shapes and shapes[name][0] != f.shape:
                raise LorasumError(
                    f"module {name} has ΔW {shapes[name][0]} in {shapes[name][1]} but {f.shape} "
                    f"in {a.path}; these adapters belong to different base models"
                )
            shapes.setdefault(name, (f.shape, a.path))


def parse_weights(weights: str | Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0] * n
    if isinstance(weights, str):
        try:
            weights = [float(w) for w in weights.split(",")]
        except ValueError:
            raise LorasumError(f"--weights {weights!r}: expected numbers like 1,0.5,-1") from None
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise LorasumError(f"--weights has {len(weights)} values for {n} adapters; give one each")
    if not all(math.isfinite(w) for w in weights):
        raise LorasumError(f"--weights {weights}: every weight must be a finite number")
    return weights


def adapter_fingerprint(a: Adapter) -> str:
    """Hash of an adapter's weights *and* config (r, alpha, rsLoRA, patterns change ΔW)."""
    from lorasum.models import sha256_file

    weights = sha256_file(a.path / "adapter_model.safetensors")
    return config_key({"weights": weights, "config": a.config})


def compose(
    paths: Sequence[str | Path],
    out: str | Path,
    weights: str | Sequence[float] | None = None,
    merge_into_base: str | Path | None = None,
    model: str | None = None,
    overwrite: bool = False,
    reuse_same: bool = False,
) -> dict:
    """`lorasum compose`: write the exact weighted sum as a PEFT adapter (and optionally a merged model)."""
    if len(paths) < 1:
        raise LorasumError("compose needs at least one adapter")
    adapters = [read_adapter(p) for p in paths]
    w = parse_weights(weights, len(adapters))
    check_compatible(adapters)
    base = model or next((a.base_model for a in adapters if a.base_model), None)
    key = config_key(
        {
            "sources": [adapter_fingerprint(a) for a in adapters],
            "weights": w,
            "base_model": base,
            "version": __version__,
        }
    )
    out = Path(out)
    # reuse_same: with overwrite, still keep a finished result that has the same key.
    reuse = check_output_dir(out, key, overwrite and not (reuse_same and existing_key(out) == key))
    merged_out = Path(merge_into_base) if merge_into_base else None
    if merged_out is not None:
        if base is None:
            raise LorasumError("the adapters do not name their base model; pass --model")
        if merged_out.resolve() == out.resolve():
            raise LorasumError("--merge-into-base must differ from --out")
        check_output_dir(merged_out, None, overwrite)
    marker = {
        "kind": "composed",
        "key": key,
        "lorasum_version": __version__,
        "sources": [str(a.path) for a in adapters],
        "weights": w,
        "base_model": base,
    }
    if not reuse:
        modules = sum_factors([a.modules for a in adapters], w)
        fan_in_fan_out = any(a.config.get("fan_in_fan_out") for a in adapters)
        with atomic_dir(out, marker=marker) as tmp:
            write_adapter(
                tmp,
                modules,
                base,
                fan_in_fan_out=fan_in_fan_out,
                task_type=adapters[0].config.get("task_type") or "CAUSAL_LM",
            )
    else:
        marker = read_json(out / "lorasum.json")
    if merged_out is not None:
        merge_adapter_into_base(out, base, merged_out)
        marker = {**marker, "merged_model": str(merged_out)}
    return marker


def merge_adapter_into_base(adapter_dir: str | Path, model_spec: str, out: str | Path) -> Path:
    """Write base + ΔW as a full transformers model (PEFT's safe merge: checks for NaN/inf)."""
    from peft import PeftModel

    from lorasum.models import load_model, load_tokenizer

    adapter = read_adapter(adapter_dir)
    model = load_model(model_spec)
    tokenizer = load_tokenizer(model_spec)
    check_fits(adapter, model, model_spec)
    peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    merged = peft_model.merge_and_unload(safe_merge=True)
    marker = {
        "kind": "merged_model",
        "key": None,
        "adapter": str(adapter_dir),
        "base_model": model_spec,
    }
    with torch.no_grad(), atomic_dir(out, marker=marker) as tmp:
        merged.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
    return Path(out)
