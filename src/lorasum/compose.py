"""Composition of LoRA adapters into one PEFT adapter, by a registered merge method.

The default method `sum` is exact (rank concatenation, ΔW = Σ w_i·s_i·B_i·A_i, no SVD): the
composed adapter's rank is Σ r_i. Other methods (`lorasum.methods`) compress or reshape the sum.
A module that an adapter does not adapt contributes a zero ΔW. Every output holds the resolved
recipe (lorasum.json and recipe.json) and a short model card (README.md).
"""

from __future__ import annotations

import logging
import math
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorasum._version import __version__
from lorasum.adapters import (  # noqa: F401 (check_compatible: re-exported)
    Adapter,
    check_compatible,
    check_fits,
    read_adapter,
    weights_file,
    write_adapter,
)
from lorasum.adapters import weights_sha256 as _weights_sha256
from lorasum.analysis.calibration import calibrate_adapters, calibration_keys, parse_calibration
from lorasum.errors import LorasumError
from lorasum.io import (
    MARKER,
    atomic_dir,
    atomic_write_text,
    check_output_dir,
    config_key,
    existing_key,
    read_json,
    write_json,
)
from lorasum.methods import (
    MergeConfig,
    get_method,
    merge_adapters,
    method_names,
    resolve_weights,
)

log = logging.getLogger(__name__)

RECIPE_NAME = "recipe.json"
CARD_NAME = "README.md"
GGUF_DIR, GGUF_NAME = "gguf", "adapter.gguf"  # compose --format gguf: out/gguf/adapter.gguf


def _check_inside(out: Path, inputs: Sequence[Path], flag: str) -> None:
    """Refuse an output that is, contains or lies inside an input adapter directory."""
    o = out.resolve()
    for p in inputs:
        q = p.resolve()
        if o == q or q in o.parents or o in q.parents:
            raise LorasumError(
                f"{flag} {out} overlaps the input adapter {p}; write the result to a separate "
                "directory so no input is changed"
            )


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


def adapter_fingerprint(a: Adapter, weights_sha256: str | None = None) -> str:
    """Hash of an adapter's weights *and* config (r, alpha, rsLoRA, patterns change ΔW)."""
    weights = weights_sha256 or _weights_sha256(a)
    return config_key({"weights": weights, "config": a.config})


def _command(
    paths: Sequence[Path],
    out: Path,
    config: MergeConfig,
    weights: list[float] | None,
    calibration: Sequence[list[str] | None] | None = None,
):
    """The `lorasum compose` command line that reproduces a composition."""
    args = ["lorasum", "compose", *map(str, paths)]
    if config.method != "sum":
        args += ["--method", config.method]
    if weights is not None:
        args += ["--weights", ",".join(f"{w:g}" for w in weights)]
    for name in config.given():
        args += ["--" + name.replace("_", "-"), str(config.option(name))]
    if calibration is not None:
        args += ["--calibration", *("own" if c is None else ",".join(c) for c in calibration)]
    return shlex.join([*args, "--out", str(out)])


def _model_card(recipe: dict) -> str:
    """A short README.md: what made the adapter and how to load it."""
    method = get_method(recipe["method"])
    kept = [m["kept_energy"] for m in recipe["modules"].values()]
    errors = [m["relative_error"] for m in recipe["modules"].values()]
    rows = "\n".join(
        f"| `{i['path']}` | {w:g} | `{i['weights_sha256'][:16]}…` |"
        for i, w in zip(recipe["inputs"], recipe["weights"], strict=True)
    )
    quality = (
        "exact: ΔW = Σ wᵢ·ΔWᵢ"
        if method.exact
        else f"kept energy per module min {min(kept):.4f} (mean {sum(kept) / len(kept):.4f}), "
        f"relative error max {max(errors):.2e}, relative to the method's own full-rank result"
    )
    return (
        "---\n"
        "library_name: peft\n"
        f"base_model: {recipe['base_model'] or 'unknown'}\n"
        "tags: [lora, lorasum, merge]\n"
        "---\n\n"
        f"# Composed LoRA adapter ({method.name})\n\n"
        f"Made by lorasum {recipe['lorasum_version']} with\n\n"
        f"```bash\n{recipe['command']}\n```\n\n"
        f"Method `{method.name}`: {method.summary}. Options: "
        f"{', '.join(f'{k}={v}' for k, v in recipe['options'].items()) or 'none'}.\n\n"
        f"| adapter | weight | weights sha256 |\n|---|---:|---|\n{rows}\n\n"
        f"Rank {recipe['rank']} for all {len(kept)} modules, lora_alpha = rank; {quality}. "
        "The full recipe (inputs and their hashes, per-module kept energy) is in recipe.json.\n\n"
        "Load it with PEFT: `PeftModel.from_pretrained(base_model, this_directory)`.\n"
    )


@dataclass
class _ComposeInputs:
    """What a composition reads and the key its output is cached under."""

    adapters: list[Adapter]
    method: Any
    given: list[float] | None
    weights: list[float]
    base: str | None
    shas: list[str]
    fingerprints: list[str]
    calibration_data: list | None
    modules: list[str] | None
    resolved: dict
    key: str

    @classmethod
    def read(cls, paths, weights, model, config: MergeConfig, calibration) -> _ComposeInputs:
        if len(paths) < 1:
            raise LorasumError("compose needs at least one adapter")
        merge_method = get_method(config.method)
        adapters = [read_adapter(p, strict=True) for p in paths]
        given = None if weights is None else parse_weights(weights, len(adapters))
        w = resolve_weights(merge_method, given, len(adapters))
        check_compatible(adapters)
        base = model or next((a.base_model for a in adapters if a.base_model), None)
        shas = [_weights_sha256(a) for a in adapters]
        fingerprints = [adapter_fingerprint(a, sha) for a, sha in zip(adapters, shas, strict=True)]
        key_fields: dict[str, Any] = {
            "sources": fingerprints,
            "weights": w,
            "base_model": base,
            "version": __version__,
        }
        calibration_data = parse_calibration(calibration, len(adapters))
        union = None
        if merge_method.calibration:
            if calibration_data is None:
                calibration_data = [None] * len(adapters)
            union = sorted(set().union(*(a.modules for a in adapters)))
            key_fields["calibration"] = calibration_keys(
                adapters, calibration_data, model=model, modules=union
            )
        elif calibration_data is not None:
            users = [m for m in method_names() if get_method(m).calibration]
            raise LorasumError(
                f"--calibration does not apply to {merge_method.name} (it applies to "
                f"{', '.join(users)})"
            )
        resolved = config.resolved()
        if config.method != "sum" or config.option("pad_rank_to") is not None:
            key_fields["merge"] = resolved  # the plain sum keeps the key it always had
        if merge_method.dense and config.option("rank") is None:
            key_fields["dense_rank"] = "file"  # truncation at the file's rank, not per-module Σr
        return cls(
            adapters,
            merge_method,
            given,
            w,
            base,
            shas,
            fingerprints,
            calibration_data,
            union,
            resolved,
            config_key(key_fields),
        )


def compose_key(
    paths: Sequence[str | Path], config: MergeConfig, weights=None, model=None, calibration=None
) -> str:
    """The key `compose` caches its output under, without composing (for a study's plan)."""
    return _ComposeInputs.read(paths, weights, model, config, calibration).key


def _check_merged_out(
    merge_into_base: str | Path | None, out: Path, inputs: _ComposeInputs, overwrite: bool
) -> Path | None:
    """The --merge-into-base directory, checked (a base model, apart from --out and the
    inputs, empty or overwritable); None when not asked for."""
    merged_out = Path(merge_into_base) if merge_into_base else None
    if merged_out is not None:
        if inputs.base is None:
            raise LorasumError("the adapters do not name their base model; pass --model")
        if merged_out.resolve() == out.resolve():
            raise LorasumError("--merge-into-base must differ from --out")
        _check_inside(merged_out, [a.path for a in inputs.adapters], "--merge-into-base")
        check_output_dir(merged_out, None, overwrite)
    return merged_out


def _recipe(
    inputs: _ComposeInputs, out: Path, config: MergeConfig, result: Any, calibrated: list | None
) -> dict:
    """The recipe.json of a composed adapter: command, method, inputs and their hashes,
    calibration statistics used, and the per-module report of the merge."""
    adapters = inputs.adapters
    return {
        "lorasum_version": __version__,
        "command": _command(
            [a.path for a in adapters], out, config, inputs.given, inputs.calibration_data
        ),
        "method": inputs.method.name,
        "options": {k: v for k, v in inputs.resolved.items() if k != "method"},
        "weights": inputs.weights,
        "base_model": inputs.base,
        "inputs": [
            {
                "path": str(a.path),
                "fingerprint": fp,
                "weights_sha256": sha,
                "r": a.config.get("r"),
                "lora_alpha": a.config.get("lora_alpha"),
                "use_rslora": bool(a.config.get("use_rslora")),
                "modules": len(a.modules),
            }
            for a, fp, sha in zip(adapters, inputs.fingerprints, inputs.shas, strict=True)
        ],
        "rank": result.rank,
        "needed_rank": result.needed_rank,
        **(
            {
                "calibration": [
                    {"key": c.key, "file": str(c.path) if c.path else None, **c.info}
                    for c in calibrated
                ]
            }
            if calibrated is not None
            else {}
        ),
        "modules": result.report,
    }


def _write_composed(
    inputs: _ComposeInputs, out: Path, config: MergeConfig, model: str | None
) -> dict:
    """Merge the inputs and write the adapter, its recipe and model card atomically into
    ``out``; returns the lorasum.json marker."""
    adapters, w, base = inputs.adapters, inputs.weights, inputs.base
    grams, calibrated = None, None
    if inputs.method.calibration:
        calibrated = calibrate_adapters(
            adapters, inputs.calibration_data, model=model, modules=inputs.modules
        )
        # normalised in place: raw sums and Ĝ side by side were 2 × 725 MB per domain of the
        # default model (with the model, the standard study's 6.2 GB worker peak)
        grams = [c.take_normalised() for c in calibrated]
    result = merge_adapters([a.modules for a in adapters], w, config, grams)
    recipe = _recipe(inputs, out, config, result, calibrated)
    marker = {
        "kind": "composed",
        "key": inputs.key,
        "lorasum_version": __version__,
        "sources": [str(a.path) for a in adapters],
        "weights": w,
        "base_model": base,
        "method": inputs.method.name,
        "recipe": recipe,
    }
    fan_in_fan_out = any(a.config.get("fan_in_fan_out") for a in adapters)
    with atomic_dir(out, marker=marker) as tmp:
        write_adapter(
            tmp,
            result.modules,
            base,
            fan_in_fan_out=fan_in_fan_out,
            task_type=adapters[0].config.get("task_type") or "CAUSAL_LM",
        )
        write_json(tmp / RECIPE_NAME, recipe)
        atomic_write_text(tmp / CARD_NAME, _model_card(recipe))
    return marker


def _warn_shared_slots(paths: Sequence[Path]) -> None:
    """One warning line when two adapters trained `--lora-a disjoint` share a slot (the sum
    is still exact; it only loses the zero input-side cross-talk the slots were for)."""
    from lorasum.training.lora_a import shared_slots

    markers = {}
    for p in paths:
        try:
            markers[str(p)] = read_json(Path(p) / MARKER)
        except (OSError, ValueError):
            markers[str(p)] = None  # not trained by lorasum: nothing known of its A
    warning = shared_slots(markers)
    if warning is not None:
        log.warning(warning)


def compose(
    paths: Sequence[str | Path],
    out: str | Path,
    weights: str | Sequence[float] | None = None,
    merge_into_base: str | Path | None = None,
    model: str | None = None,
    overwrite: bool = False,
    reuse_same: bool = False,
    *,
    method: str = "sum",
    config: MergeConfig | None = None,
    calibration: Sequence[str | Sequence[str] | None] | None = None,
    format: str = "peft",
    outtype: str = "f32",
    **options: Any,
) -> dict:
    """`lorasum compose`: merge adapters into one PEFT adapter (and optionally a merged model).

    ``method`` and ``options`` (those the method declares, `lorasum.methods.options`: rank,
    keep, density, majority_sign, seed, method_scale, task_rank, regmean_alpha,
    projection_ratio, pad_rank_to …) choose the merge; or pass a ready ``config``. Methods that need input statistics (regmean, …) take
    ``calibration``: per adapter a comma list of data sources or 'own'/None (default: every
    adapter's own training data, from its lorasum.json), computed on ``model`` (default: the
    adapters' base model) and cached beside each adapter (`lorasum.analysis.calibration`).
    ``format="gguf"`` also writes the composed adapter as a GGUF LoRA for llama.cpp/Ollama
    (``outtype`` f32/f16/q8_0) into ``out/gguf/`` (`lorasum.export`).
    Returns the output's lorasum.json marker, which holds the recipe.
    """
    if format not in ("peft", "gguf"):
        raise LorasumError(f"unknown --format {format!r}; use peft or gguf")
    if config is None:
        config = MergeConfig(method=method, **options)
    elif options or method != "sum":
        raise TypeError("pass either config or method/options, not both")
    inputs = _ComposeInputs.read(paths, weights, model, config, calibration)
    _warn_shared_slots([a.path for a in inputs.adapters])
    out = Path(out)
    _check_inside(out, [a.path for a in inputs.adapters], "--out")
    # reuse_same: with overwrite, still keep a finished result that has the same key.
    key = inputs.key
    reuse = check_output_dir(out, key, overwrite and not (reuse_same and existing_key(out) == key))
    merged_out = _check_merged_out(merge_into_base, out, inputs, overwrite)
    if not reuse:
        marker = _write_composed(inputs, out, config, model)
    else:
        marker = read_json(out / "lorasum.json")
    if format == "gguf":
        from lorasum.export import export_adapter

        gguf_info = export_adapter(
            out, out / GGUF_DIR / GGUF_NAME, outtype=outtype, model=model, overwrite=True
        )
        marker = {**marker, "gguf": gguf_info["gguf"]}
    if merged_out is not None:
        merge_adapter_into_base(out, inputs.base, merged_out, recipe=marker.get("recipe"))
        marker = {**marker, "merged_model": str(merged_out)}
    return marker


def merge_adapter_into_base(
    adapter_dir: str | Path, model_spec: str, out: str | Path, recipe: dict | None = None
) -> Path:
    """Write base + ΔW as a full transformers model (PEFT's safe merge: checks for NaN/inf).

    ``recipe`` (the composed adapter's) is saved beside it as recipe.json with a model card.
    """
    from peft import PeftModel

    from lorasum.models.loading import load_model, load_tokenizer

    adapter = read_adapter(adapter_dir)
    model = load_model(model_spec)
    tokenizer = load_tokenizer(model_spec)
    check_fits(adapter, model, model_spec)
    peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    try:
        merged = peft_model.merge_and_unload(safe_merge=True)
    except ValueError as e:  # PEFT's safe_merge found NaN/inf in a merged weight
        if "NaN" not in str(e):
            raise
        raise LorasumError(
            f"merging {adapter_dir} into {model_spec} gives non-finite weights; nothing was "
            "written: use smaller --weights"
        ) from None
    marker = {
        "kind": "merged_model",
        "key": None,
        "adapter": str(adapter_dir),
        "base_model": model_spec,
    }
    with torch.no_grad(), atomic_dir(out, marker=marker) as tmp:
        merged.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        if recipe is not None:
            recipe = {**recipe, "merged_into": model_spec, "adapter": str(adapter_dir)}
            write_json(tmp / RECIPE_NAME, recipe)
            card = _model_card(recipe).replace("library_name: peft", "library_name: transformers")
            card = card.replace("# Composed LoRA adapter", "# Base model + composed LoRA ΔW")
            card = card.replace(
                "Load it with PEFT: `PeftModel.from_pretrained(base_model, this_directory)`.",
                f"The ΔW of the adapter {adapter_dir} is merged into {model_spec}; load it with "
                "`AutoModelForCausalLM.from_pretrained(this_directory)`.",
            )
            atomic_write_text(tmp / CARD_NAME, card)
    return Path(out)
