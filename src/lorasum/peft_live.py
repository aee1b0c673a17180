"""Composition on a live PeftModel: merge its loaded LoRA adapters in memory into a new one.

The in-memory counterpart of `lorasum.compose` (same factors, same `merge_adapters`, no disk
round trip) and the exact counterpart of PEFT's ``PeftModel.add_weighted_adapter``: with
``method="sum"`` the new adapter's ΔW is Σ w_i·s_i·B_i·A_i for every module, where s_i is the
scale PEFT itself applies (``layer.scaling``: r/alpha, rsLoRA, rank/alpha patterns).

Module names are those of `lorasum.adapters` (the PEFT key without ``base_model.model.``), so
a merge sees the same module keys as one of the same adapters read from disk. Factors are in
``nn.Linear`` orientation either way: PEFT's ``lora_A``/``lora_B`` are ``nn.Linear`` also on
GPT-2's Conv1D (``fan_in_fan_out`` only transposes B·A when it is added to the weight).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from lorasum.adapters import unsupported_config
from lorasum.compose import parse_weights
from lorasum.errors import LorasumError
from lorasum.factors import LoraFactors
from lorasum.methods import (
    MergeConfig,
    MergeResult,
    get_method,
    merge_adapters,
    method_names,
    resolve_weights,
)
from lorasum.methods.registry import all_options


def lora_layers(model: Any) -> dict[str, Any]:
    """{module name: PEFT LoRA layer} of a PeftModel, named as `lorasum.adapters` names them."""
    from peft.tuners.lora import LoraLayer

    return {
        name: module
        for name, module in model.base_model.model.named_modules()
        if isinstance(module, LoraLayer)
    }


def _layer_problem(name: str, module: str, layer: Any) -> str | None:
    """Why one layer's share of adapter ``name`` is not s·B·A of nn.Linear factors, or None."""
    if name in getattr(layer, "lora_embedding_A", {}):
        return f"adapts the embedding {module} (embedding LoRA is not supported)"
    if name in getattr(layer, "lora_variant", {}):
        variant = type(layer.lora_variant[name]).__name__
        return f"uses the LoRA variant {variant} at {module}, whose ΔW is not s·B·A"
    if getattr(layer, "lora_bias", {}).get(name):
        return f"has a LoRA bias at {module}, whose ΔW is not s·B·A"
    if name in layer.lora_A and not (
        type(layer.lora_A[name]) is nn.Linear and type(layer.lora_B[name]) is nn.Linear
    ):
        kind = type(layer.lora_A[name]).__name__
        return f"has {kind} factors at {module} (only LoRA on linear layers is supported)"
    return None


def _adapter_problem(model: Any, name: str, layers: dict[str, Any]) -> str | None:
    """Why adapter ``name`` of ``model`` cannot be composed as Σ s·B·A, or None."""
    config = model.peft_config[name]
    peft_type = str(getattr(config.peft_type, "value", config.peft_type))
    if peft_type != "LORA":
        return f"is a {peft_type} adapter, not LoRA; compose LoRA adapters only"
    problem = unsupported_config(config.to_dict())
    if problem:
        return problem
    for module, layer in layers.items():
        problem = _layer_problem(name, module, layer)
        if problem:
            return problem
    if not any(name in layer.lora_A for layer in layers.values()):
        return "adapts no linear module"
    return None


def live_factors(name: str, layers: dict[str, Any]) -> dict[str, LoraFactors]:
    """Adapter ``name``'s fp32 CPU factors per module: A (r, d_in), B (d_out, r) and the
    scale PEFT applies (``layer.scaling``), as `lorasum.adapters.read_adapter` gives them."""
    return {
        module: LoraFactors(
            A=layer.lora_A[name].weight.detach().float().cpu(),  # (r, d_in)
            B=layer.lora_B[name].weight.detach().float().cpu(),  # (d_out, r)
            scale=float(layer.scaling[name]),
        )
        for module, layer in sorted(layers.items())
        if name in layer.lora_A
    }


def _check_call(model: Any, adapters: Any, adapter_name: Any) -> dict[str, Any]:
    """The model's LoRA layers, after checking the model and the names (LorasumError else)."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        raise LorasumError(
            f"add_weighted_adapter needs a peft.PeftModel, got {type(model).__name__}; load "
            "the adapters with PeftModel.from_pretrained(base, path) and model.load_adapter"
        )
    if isinstance(adapters, str) or not isinstance(adapters, Sequence):
        raise LorasumError(f"adapters must be a list of adapter names, e.g. [{adapters!r}]")
    if not adapters:
        raise LorasumError("add_weighted_adapter needs at least one adapter name")
    loaded = list(model.peft_config)
    missing = [a for a in adapters if a not in loaded]
    if missing:
        raise LorasumError(
            f"adapter {missing[0]!r} is not loaded in the model (loaded: {', '.join(loaded)}); "
            "load it with model.load_adapter(path, adapter_name=...)"
        )
    if not isinstance(adapter_name, str) or not adapter_name:
        raise LorasumError(f"adapter_name must be a non-empty string, got {adapter_name!r}")
    if adapter_name in loaded:
        raise LorasumError(
            f"adapter_name {adapter_name!r} is already taken in the model; choose another "
            "name or model.delete_adapter it first"
        )
    layers = lora_layers(model)
    merged = sorted(m for m, layer in layers.items() if getattr(layer, "merged", False))
    if merged:
        raise LorasumError(
            f"the model has adapters merged into its weights (at {merged[0]}); call "
            "model.unmerge_adapter() first"
        )
    for name in dict.fromkeys(adapters):
        problem = _adapter_problem(model, name, layers)
        if problem:
            raise LorasumError(f"adapter {name!r} {problem}")
    return layers


@contextlib.contextmanager
def _python_terms() -> Iterator[None]:
    """Re-word the shared checks' CLI messages for a Python call: ``--density`` → ``density``,
    ``compose --method sum:`` → ``add_weighted_adapter(method='sum'):``."""
    try:
        yield
    except LorasumError as e:
        message = re.sub(r"^compose --method (\S+):", r"add_weighted_adapter(method='\1'):", str(e))
        message = re.sub(r"--([a-z][a-z-]*)", lambda m: m.group(1).replace("-", "_"), message)
        raise LorasumError(message) from None


def _merge_config(method: str, options: dict[str, Any]) -> MergeConfig:
    """The checked MergeConfig of a data-free method (LorasumError for everything else)."""
    merge_method = get_method(method)  # an unknown name lists the known ones
    if merge_method.calibration:
        data_free = [m for m in method_names() if not get_method(m).calibration]
        raise LorasumError(
            f"method {method} needs calibration data, which add_weighted_adapter does not "
            f"take; use lorasum.compose(paths, out, method={method!r}, calibration=...) or a "
            f"data-free method: {', '.join(data_free)}"
        )
    try:
        return MergeConfig(method=method, **options)
    except TypeError:
        names = {o.name for o in all_options()}
        unknown = sorted(set(options) - names)
        known = sorted(names)
        raise LorasumError(
            f"unknown method option {', '.join(unknown)}; the options are {', '.join(known)}"
        ) from None


def _new_config(model: Any, adapters: Sequence[str], result: MergeResult):
    """A LoraConfig of the result: rank R, alpha R (scale 1), exactly its modules."""
    from peft import LoraConfig

    first = model.peft_config[adapters[0]]
    return LoraConfig(
        r=result.rank,
        lora_alpha=result.rank,
        lora_dropout=0.0,
        target_modules=sorted(result.modules),  # full module names: exactly these
        fan_in_fan_out=any(model.peft_config[a].fan_in_fan_out for a in adapters),
        bias="none",
        task_type=first.task_type,
        base_model_name_or_path=first.base_model_name_or_path,
    )


def _copy_factors(name: str, layers: dict[str, Any], modules: dict[str, LoraFactors]) -> None:
    """Write the merged factors (scale 1, folded into A) into adapter ``name``'s layers."""
    with torch.no_grad():
        for module, f in modules.items():
            layer = layers[module]
            if float(layer.scaling[name]) != 1.0:
                raise RuntimeError(f"{module}: scaling {layer.scaling[name]} of the new adapter")
            A, B = layer.lora_A[name].weight, layer.lora_B[name].weight
            A.copy_(f.scale * f.A)  # (R, d_in), copy_ casts to the layer's dtype and device
            B.copy_(f.B)  # (d_out, R)


def add_weighted_adapter(
    model: Any,
    adapters: Sequence[str],
    weights: Sequence[float] | None = None,
    method: str = "sum",
    adapter_name: str = "composed",
    **method_options: Any,
) -> Any:
    """Merge LoRA adapters loaded in a ``peft.PeftModel`` into a new adapter, in memory.

    ``adapters``: names of the model's LoRA adapters; ``weights``: one per adapter (default
    1); ``method`` and ``method_options``: any data-free registered merge method and its
    `MergeConfig` options (e.g. ``method="ties", density=0.5``). The result is added as
    ``adapter_name`` (rank R of the result, lora_alpha = R, the union of the modules), made
    the active adapter, and the model is returned. With ``sum`` it is exact: per module
    ΔW = Σ w_i·s_i·B_i·A_i with PEFT's own scales s_i.

    Every mistake raises one-line `LorasumError` before the model is changed; the new
    adapter is added only after the merge succeeded (and removed again if copying fails).
    """
    layers = _check_call(model, adapters, adapter_name)
    with _python_terms():
        config = _merge_config(method, method_options)
        given = None if weights is None else parse_weights(weights, len(adapters))
        w = resolve_weights(get_method(method), given, len(adapters))
    factors = [live_factors(name, layers) for name in adapters]
    with _python_terms():
        result = merge_adapters(factors, w, config)
    model.add_adapter(adapter_name, _new_config(model, adapters, result))
    try:
        _copy_factors(adapter_name, lora_layers(model), result.modules)
    except BaseException:
        model.delete_adapter(adapter_name)
        raise
    model.set_adapter(adapter_name)
    return model
