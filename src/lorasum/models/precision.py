"""Precision and hardware: CPU flags, the measured bf16 verdict, ``--precision`` resolved per
device, the device picked, and the casting hooks that give autocast's numbers with less work
(frozen linear weights and norm outputs cast once).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

from lorasum.errors import LorasumError
from lorasum.models.loading import lorasum_home
from lorasum.settings import PRECISIONS, RuntimeSettings

log = logging.getLogger(__name__)


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
