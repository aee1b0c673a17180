"""LoRA adapters on disk (PEFT format) ⇄ per-module factors {module: LoraFactors}.

A PEFT LoRA adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors``
with keys ``base_model.model.<module>.lora_A.weight`` (r, d_in) and ``….lora_B.weight``
(d_out, r). The scale is alpha/r, or alpha/√r with rsLoRA; ``rank_pattern``/``alpha_pattern``
override r/alpha per module.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lorasum.errors import LorasumError
from lorasum.factors import LoraFactors
from lorasum.io import sha256_file

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"  # PEFT's old pickle format: loaded only with --allow-pickle
PREFIX = "base_model.model."
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<AB>[AB])(?:\.[^.]+)?\.weight$")


@dataclass
class Adapter:
    """A LoRA adapter read from disk."""

    path: Path
    config: dict
    modules: dict[str, LoraFactors] = field(default_factory=dict)

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    @property
    def name(self) -> str:
        return self.path.name


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rule: a pattern key matches a module name when it matches its dotted suffix."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


# Config keys whose (truthy) value means ΔW is not s·B·A on the base weights, or the adapter
# carries more than ΔW. Checked in this order; the first hit is reported.
_UNSUPPORTED_CONFIG = (
    ("use_dora", "uses DoRA, whose ΔW is not s·B·A"),
    ("lora_bias", "has LoRA bias terms, whose ΔW is not s·B·A"),
    (
        "modules_to_save",
        "has modules_to_save (fully trained module copies), which a sum of ΔW cannot compose",
    ),
    ("trainable_token_indices", "trains embedding rows (trainable tokens), which are not ΔW"),
    ("target_parameters", "adapts parameters directly (target_parameters), not linear modules"),
    ("alora_invocation_tokens", "is an activated LoRA, applied only after its invocation tokens"),
    ("use_qalora", "is a QA-LoRA adapter, whose ΔW acts on pooled inputs"),
    ("layer_replication", "replicates layers (layer_replication), changing the base model"),
    ("use_bdlora", "is a block-diagonal (BD-LoRA) adapter"),
    ("arrow_config", "is an Arrow routing adapter"),
    ("kasa_config", "is a KaSA adapter, whose ΔW is not s·B·A"),
    ("velora_config", "is a VeLoRA adapter"),
    ("monteclora_config", "is a MonteCLoRA adapter, whose ΔW is not s·B·A"),
)
# init_lora_weights values that change the base weights the adapter is relative to.
_BASE_CHANGING_INIT = ("pissa", "olora", "corda", "loftq", "lora_ga")


def unsupported_config(config: dict, strict: bool = True) -> str | None:
    """Why an adapter config cannot be composed exactly as Σ s·B·A, or None if it can.

    Without ``strict`` only what makes ΔW itself unreadable (DoRA, LoRA bias) is reported.
    """
    for key, why in _UNSUPPORTED_CONFIG if strict else _UNSUPPORTED_CONFIG[:2]:
        if config.get(key):
            return f"{why}; compose plain LoRA adapters (re-train or re-save without {key})"
    init = config.get("init_lora_weights")
    if strict and isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INIT):
        return (
            f"was initialised with {init!r}, which changes the base weights; convert it to a "
            "plain LoRA first (PEFT: save_pretrained(path_initial_model_for_weight_conversion=…))"
        )
    return None


# Tensors that are not lora_A/lora_B weights, most specific first: (substring, why).
_TENSOR_PROBLEMS = (
    ("lora_embedding", "embedding LoRA is not supported; adapt linear modules only"),
    ("lora_magnitude", "DoRA magnitudes are not supported; use plain LoRA"),
    (
        "modules_to_save",
        "modules_to_save copies of whole modules cannot be composed; save without them",
    ),
    (".bias", "LoRA bias terms are not supported; use plain LoRA"),
)


def _tensor_problem(keys: list[str]) -> tuple[str, str]:
    """The most telling of several non-LoRA tensors, and why it cannot be composed."""
    for part, why in _TENSOR_PROBLEMS:
        for key in sorted(keys):
            if part in key:
                return key, why
    key = sorted(keys)[0]
    return key, "not a LoRA factor of a linear module; only plain LoRA adapters can be composed"


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    """A pickle checkpoint through ``torch.load(weights_only=True)``: tensors only, no code."""
    import pickle

    try:
        tensors = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LorasumError(
            f"{path} is not a plain tensor checkpoint ({first[:120]}); convert it to "
            "safetensors in a trusted environment"
        ) from None
    if not isinstance(tensors, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()
    ):
        raise LorasumError(f"{path} does not hold a name → tensor mapping; re-save the adapter")
    return tensors


def _load_weights(path: Path, allow_pickle: bool | None) -> dict[str, torch.Tensor]:
    """The adapter's tensors: safetensors, or (only when allowed) a pickle checkpoint."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from lorasum.io import pickle_allowed

    w_path, bin_path = path / WEIGHTS_NAME, path / PICKLE_NAME
    if not w_path.is_file():
        if not bin_path.is_file():
            raise LorasumError(
                f"adapter {path} has no {WEIGHTS_NAME}; save it with PEFT's safetensors"
            )
        if not pickle_allowed(allow_pickle):
            raise LorasumError(
                f"adapter {path} holds only a pickle checkpoint ({PICKLE_NAME}), which can run "
                "code when loaded; re-save it as safetensors, or pass --allow-pickle if you "
                "trust it (loaded with torch.load(weights_only=True))"
            )
        return _load_pickle(bin_path)
    try:
        return load_file(str(w_path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise LorasumError(
            f"{w_path} is corrupt or unreadable ({str(e)[:120]}); re-save it"
        ) from None


def weights_file(path: str | Path) -> Path:
    """The file holding an adapter's tensors (safetensors, else the pickle checkpoint)."""
    path = Path(path)
    w_path = path / WEIGHTS_NAME
    return w_path if w_path.is_file() or not (path / PICKLE_NAME).is_file() else path / PICKLE_NAME


def _read_config(path: Path, strict: bool) -> dict:
    """The adapter's adapter_config.json, checked: a PEFT LoRA config with valid r/lora_alpha
    and nothing that ``unsupported_config`` refuses."""
    cfg_path = path / CONFIG_NAME
    if not cfg_path.is_file():
        raise LorasumError(
            f"adapter {path} has no {CONFIG_NAME}; pass a directory that PEFT's "
            "save_pretrained wrote"
        )
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise LorasumError(f"{cfg_path} is not valid JSON ({e}); re-save the adapter") from None
    if not isinstance(config, dict) or "peft_type" not in config:
        raise LorasumError(
            f"{cfg_path} is not a PEFT adapter config (no peft_type); pass a directory that "
            "PEFT's save_pretrained wrote"
        )
    if config.get("peft_type") != "LORA":
        raise LorasumError(
            f"adapter {path} is not a LoRA adapter (peft_type {config.get('peft_type')}); "
            "pass LoRA adapters only"
        )
    bad = [
        k
        for k, t in (("r", int), ("lora_alpha", (int, float)))
        if k in config and (isinstance(config[k], bool) or not isinstance(config[k], t))
    ]
    if bad or config.get("r", 1) < 1:
        raise LorasumError(
            f"{cfg_path}: {', '.join(bad) or 'r'} has an invalid value; re-save the adapter"
        )
    problem = unsupported_config(config, strict)
    if problem:
        raise LorasumError(f"adapter {path} {problem}")
    return config


def _lora_pairs(
    path: Path, w_path: Path, tensors: dict[str, torch.Tensor], strict: bool
) -> dict[str, dict[str, torch.Tensor]]:
    """{module: {"A": lora_A, "B": lora_B}} from the saved tensors; refuses the other tensors
    a sum of ΔW cannot represent (all of them when ``strict``)."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    others = [key for key in tensors if _KEY.match(key) is None]
    if not strict:  # PEFT applies e.g. modules_to_save copies itself; ΔW ignores them
        others = [k for k in others if "lora_embedding" in k or "lora_magnitude" in k]
    if others:
        key, why = _tensor_problem(others)
        raise LorasumError(f"adapter {path} holds tensor {key}: {why}")
    for key, tensor in tensors.items():
        m = _KEY.match(key)
        if m is None:
            continue
        module = m.group("module").removeprefix(PREFIX)
        pairs.setdefault(module, {})[m.group("AB")] = tensor
    if not pairs:
        raise LorasumError(f"{w_path} holds no lora_A/lora_B tensors; is it a LoRA adapter?")
    return pairs


def _module_factors(
    path: Path, module: str, ab: dict[str, torch.Tensor], config: dict
) -> LoraFactors:
    """One module's checked fp32 factors and its scale (alpha/r, or alpha/√r with rsLoRA)."""
    if set(ab) != {"A", "B"}:
        raise LorasumError(
            f"adapter {path}: module {module} has lora_{set(ab).pop()} only; re-save the adapter"
        )
    if not (ab["A"].is_floating_point() and ab["B"].is_floating_point()):
        raise LorasumError(
            f"adapter {path}: module {module} has {ab['A'].dtype}/{ab['B'].dtype} weights, "
            "not floating point; re-save the adapter"
        )
    A, B = ab["A"].float(), ab["B"].float()  # (r, in), (out, r)
    if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
        raise LorasumError(
            f"adapter {path}: module {module} has incompatible shapes "
            f"A {tuple(A.shape)} and B {tuple(B.shape)}"
        )
    if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
        raise LorasumError(
            f"adapter {path}: module {module} holds NaN/inf weights; re-train or re-save it"
        )
    r = _pattern_value(config.get("rank_pattern") or {}, module, config.get("r", 8))
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
    if r != A.shape[0]:
        raise LorasumError(
            f"adapter {path}: module {module} has rank {A.shape[0]} but the config says {r}; "
            "fix r/rank_pattern in its adapter_config.json"
        )
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return LoraFactors(A=A, B=B, scale=float(scale))


def read_adapter(
    path: str | Path, strict: bool = False, allow_pickle: bool | None = None
) -> Adapter:
    """Read and validate a PEFT LoRA adapter directory into fp32 factors.

    ``strict`` (compose, similarity) also refuses what a sum of ΔW cannot represent:
    ``modules_to_save``, trainable tokens, base-changing inits, any tensor that is not a
    lora_A/lora_B weight. Without it (evaluation, where PEFT applies the adapter itself) such
    extras are ignored, but DoRA, LoRA bias and embedding LoRA are still refused.
    Weights are read from safetensors; a pickle ``adapter_model.bin`` only with
    ``allow_pickle`` (default: ``$LORASUM_ALLOW_PICKLE``, set by ``--allow-pickle``), and then
    through ``torch.load(weights_only=True)``.
    """
    path = Path(path)
    if not path.is_dir():
        raise LorasumError(f"adapter {path} is not a directory; pass a PEFT adapter directory")
    w_path = weights_file(path)
    config = _read_config(path, strict)
    tensors = _load_weights(path, allow_pickle)
    pairs = _lora_pairs(path, w_path, tensors, strict)
    modules = {
        module: _module_factors(path, module, ab, config) for module, ab in sorted(pairs.items())
    }
    return Adapter(path=path, config=config, modules=modules)


def write_adapter(
    out: Path,
    modules: dict[str, LoraFactors],
    base_model: str | None,
    fan_in_fan_out: bool = False,
    task_type: str | None = "CAUSAL_LM",
) -> None:
    """Write factors as a PEFT LoRA adapter into an (existing, empty) directory.

    Every module must have the same rank r; the scales are folded so that the config's
    alpha = r (scale 1) reproduces ΔW = scale·B·A exactly.
    """
    from peft import LoraConfig
    from safetensors.torch import save_file

    ranks = {f.rank for f in modules.values()}
    if len(ranks) != 1:
        raise ValueError(f"write_adapter needs one rank for all modules, got {sorted(ranks)}")
    r = ranks.pop()
    config = LoraConfig(
        r=r,
        lora_alpha=r,
        lora_dropout=0.0,
        target_modules=sorted(modules),  # full module names: exactly these, nothing else
        fan_in_fan_out=fan_in_fan_out,
        bias="none",
        task_type=task_type,
        base_model_name_or_path=base_model,
    )
    config.save_pretrained(str(out))
    tensors = {}
    for name, f in modules.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = (f.scale * f.A).float().contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = f.B.float().contiguous()
    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt"})


def delta_shape(module: nn.Module) -> tuple[int, int] | None:
    """(d_out, d_in) of a linear-like module, or None if it is not one."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, Conv1D):  # weight stored (d_in, d_out)
        return (module.weight.shape[1], module.weight.shape[0])
    if isinstance(module, nn.Linear):
        return (module.out_features, module.in_features)
    return None


def check_fits(adapter: Adapter, model: nn.Module, model_name: str) -> None:
    """Raise when the adapter's modules are missing from the model or have other shapes."""
    problems = []
    for name, f in adapter.modules.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            problems.append(f"module {name} does not exist")
            continue
        base = getattr(module, "base_layer", module)  # already LoRA-wrapped
        shape = delta_shape(base)
        if shape != f.shape:
            problems.append(f"module {name} is {shape}, adapter ΔW is {f.shape}")
        if len(problems) >= 3:
            break
    if problems:
        raise LorasumError(
            f"adapter {adapter.path} does not fit model {model_name} ({'; '.join(problems)}); "
            f"it was made for {adapter.base_model!r}: pass that --model"
        )


def _layer_root(module: str) -> str | None:
    """The path to a module's layer list: 'model.layers' for 'model.layers.0.self_attn.q_proj'."""
    parts = module.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[:i])
    return None


def check_compatible(adapters: Sequence[Adapter], fan_in_fan_out: bool = True) -> None:
    """Refuse adapters that cannot belong to one base model (or one fan_in_fan_out layout).

    Same base model where recorded; the same ΔW shape for every shared module; adapters that
    share no module must at least index their layers under a common root (``model.layers``
    vs ``transformer.h`` means two architectures); with ``fan_in_fan_out``, one setting of it.
    """
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
    for i, a in enumerate(adapters):
        for b in adapters[i + 1 :]:
            if a.modules.keys() & b.modules.keys():
                continue
            roots_a = {_layer_root(n) for n in a.modules} - {None}
            roots_b = {_layer_root(n) for n in b.modules} - {None}
            if roots_a and roots_b and not roots_a & roots_b:
                raise LorasumError(
                    f"adapters {a.path} and {b.path} adapt modules of different model "
                    f"architectures ({min(a.modules)} vs {min(b.modules)}); compose adapters "
                    "of one base model"
                )
    if fan_in_fan_out:
        layouts = {bool(a.config.get("fan_in_fan_out")) for a in adapters}
        if len(layouts) > 1:
            mixed = ", ".join(f"{a.path}={bool(a.config.get('fan_in_fan_out'))}" for a in adapters)
            raise LorasumError(
                f"adapters mix fan_in_fan_out settings ({mixed}); they were made for different "
                "layer types (Conv1D vs Linear): compose adapters of one base model"
            )


def unique_names(adapters: Sequence[Adapter]) -> list[str]:
    """The adapters' names for tables and keys: their names, or their paths where two share
    a name."""
    names = [a.name for a in adapters]
    if len(set(names)) != len(names):
        names = [str(a.path) for a in adapters]
    return names


def weights_sha256(a: Adapter) -> str:
    """The sha256 of an adapter's weights file."""
    return sha256_file(weights_file(a.path))
