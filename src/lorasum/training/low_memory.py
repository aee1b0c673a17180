"""LoRA training with less activation memory: the same numbers, fewer tensors kept for backward.

Three autograd functions replace, during ``train`` only, what autograd would otherwise keep:

1. PEFT's vanilla LoRA branch is ``lora_B(lora_A(dropout(x))) * scaling``. On a CPU,
   ``nn.Dropout`` draws a float noise tensor (``bernoulli_(1 - p)`` then ``/ (1 - p)``) and
   autograd keeps two fp32 copies per adapted module: that noise (for dx) and ``dropout(x)``
   (for dA), 8 bytes per input element. :class:`LoraBranch` computes the same forward with the
   same random draws and keeps ``x`` (which the q/k/v projections share, so it is kept once for
   three modules), a 1-byte keep mask and the rank-r hidden ``h``; the backward rebuilds
   ``dropout(x)`` exactly from the mask.
2. A SwiGLU MLP (``down(silu(gate(x)) * up(x))``: Llama, Mistral, Qwen) keeps gate, silu(gate)
   and up; :class:`SwiGLU` keeps gate and up and recomputes silu(gate) in the backward.
3. An RMSNorm with a frozen weight (same classes): :class:`RMSNorm` keeps x and the per-row
   factor, and its backward is one formula instead of autograd's chain (fp32 only).

Measured on the default model, one batch of 8 x 128: autograd keeps 2,158 MB without the first
two and 1,444 MB with them (-33 %). Used by ``train`` on a CPU. The loss is `SoftmaxNll`.

**Dropout draws.** The branch draws its mask with `keep_mask` (31 uniform random bits per
element below a threshold, compared 8 bits first: exactly Bernoulli(1 − p) per element to
2⁻³², seeded by torch's generator, about 1/4 of the random bits of a full draw), not with
``bernoulli_`` as ``nn.Dropout`` does: the same distribution, another random stream, so a
lorasum adapter trained with dropout is not the one PEFT's own loop would train. Earlier
versions drew ``bernoulli_`` on the fp32 path; that stream cost about 15 % of an fp32 step.
With the same mask, the branch's forward and the loss equal PEFT's bitwise; the gradients
equal them to float rounding, since the backward orders its products and scalings for speed
(tested by giving PEFT a dropout that draws `keep_mask`).

Under CPU bf16 autocast, x is also not cast to fp32 and back around the dropout (PEFT casts it
to the LoRA weights' dtype, autocast casts it back for the matmul: two copies per module).
The SwiGLU takeover stays fp32-only.
"""

from __future__ import annotations

import contextlib
import functools
import math
import types
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLU(torch.autograd.Function):
    """``silu(gate) * up`` keeping gate and up only (silu(gate) is recomputed for the backward)."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate).mul_(up)  # in silu's output: bitwise silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        grad_gate = grad_up = None
        if ctx.needs_input_grad[1]:
            grad_up = F.silu(gate).mul_(grad)  # bitwise grad * silu(gate), one tensor fewer
        if ctx.needs_input_grad[0]:
            grad_gate = torch.ops.aten.silu_backward(grad * up, gate)  # autograd's own formula
        return grad_gate, grad_up


# MLP classes whose forward is exactly down_proj(act_fn(gate_proj(x)) * up_proj(x))
SWIGLU_MLPS = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"})


def _swiglu_forward(mlp, x: torch.Tensor) -> torch.Tensor:
    if not mlp.training or torch.is_autocast_enabled(x.device.type):
        return type(mlp).forward(mlp, x)
    gate = mlp.gate_proj(x)  # same call order as the original: gate first, then up
    return mlp.down_proj(SwiGLU.apply(gate, mlp.up_proj(x)))


def swiglu_mlps(model: nn.Module) -> list[nn.Module]:
    """The MLPs ``lean`` can take over (SiLU activation, known class)."""
    from transformers.activations import SiLUActivation

    return [
        m
        for m in model.modules()
        if type(m).__name__ in SWIGLU_MLPS and isinstance(m.act_fn, (SiLUActivation, nn.SiLU))
    ]


class RMSNorm(torch.autograd.Function):
    """``weight * (x * rsqrt(mean(x²) + eps))`` with a frozen weight, keeping x and the
    (…, 1) factor only; the backward in one formula, r·(g·w − x·r²·mean(g·w·x)), instead of
    autograd's chain through pow, mean, rsqrt and two products (which also keeps x², x·r)."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)  # (…, 1)
        ctx.save_for_backward(x, r, weight)
        return (x * r).mul_(weight)  # the model's weight * (x * r), bitwise, one tensor fewer

    @staticmethod
    def backward(ctx, grad):
        x, r, weight = ctx.saved_tensors
        gw = grad * weight
        c = (gw * x).mean(-1, keepdim=True).mul_(r).mul_(r)  # (…, 1)
        return torch.addcmul(gw, x, c, value=-1.0).mul_(r), None, None


# Norm classes whose forward is exactly weight * (x.float() * rsqrt(mean(x²) + eps)).to(dtype)
RMS_NORMS = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"})


def _rmsnorm_forward(norm, x: torch.Tensor, base: type) -> torch.Tensor:
    """`RMSNorm` in fp32 training with a frozen weight; else ``base``'s (the class's) forward."""
    w = norm.weight
    if (
        not norm.training
        or not torch.is_grad_enabled()
        or torch.is_autocast_enabled(x.device.type)
        or x.dtype != torch.float32
        or w.dtype != torch.float32
        or w.requires_grad  # a trained norm weight: autograd's path gives its gradient
    ):
        return base.forward(norm, x)
    return RMSNorm.apply(x, w, norm.variance_epsilon)


def rms_norms(model: nn.Module) -> list[nn.Module]:
    """The RMSNorms ``lean`` can take over (known class)."""
    return [m for m in model.modules() if type(m).__name__ in RMS_NORMS]


@functools.cache
def _lean_norm_class(cls: type) -> type:
    """A subclass of the norm class whose forward is `_rmsnorm_forward`. ``lean`` swaps the
    norms' class rather than binding an instance ``forward``: transformers re-kernelizes
    hub-kernel layers (RMSNorm is one) on every train/eval switch, which drops an instance
    ``forward`` (a validation pass inside training would end the takeover)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _rmsnorm_forward(self, x, cls)

    return type(f"Lean{cls.__name__}", (cls,), {"forward": forward})


KEEP_BITS = 31  # uniform bits per element of a dropout mask
LEAD_BITS = 8  # bits drawn for every element; the other 23 only where the first 8 tie


def keep_threshold(p: float) -> int:
    """The integer t with P(u < t) = t / 2³¹ for u uniform on [0, 2³¹): within 2⁻³² of 1 − p."""
    return round((1.0 - p) * 2**KEEP_BITS)


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """A uint8 mask whose elements are kept (1, else 0) with probability 1 − p, independently.

    Each element is kept when a 31-bit uniform integer u falls below `keep_threshold` t
    (P(keep) = t/2³¹, within 2⁻³² of 1 − p: not quantised to 1/256 or 2⁻²⁴). u is compared
    lazily, most significant bits first: every element draws its top 8 bits b, and only where
    b equals t's top 8 bits (probability 1/256) are u's other 23 bits drawn and compared with
    t's. The same distribution as drawing all 31 bits, with about 1/4 of the random bits.
    The bytes come from ``random_(-2⁶³, None)`` on int64 (all 64 bits uniform: eight elements
    per draw), seeded by torch's global generator.

    uint8, not bool: on a CPU torch writes a comparison's bool result and converts bool to
    float (``x * keep``) 3–4× slower than the same with uint8 (measured on an AVX2 EPYC, 1.5M
    elements: the mask 5.3 → 4.0 ms, ``g.mul_(keep)`` 0.74 → 0.22 ms), and float × uint8 0/1
    is bitwise float × bool."""
    n = math.prod(shape)
    rest_bits = KEEP_BITS - LEAD_BITS
    t = keep_threshold(p)
    if t >= 1 << KEEP_BITS:  # p below 2⁻³²: every element is kept
        return torch.ones(shape, dtype=torch.uint8, device=device)
    lead, rest = t >> rest_bits, t & ((1 << rest_bits) - 1)
    words = torch.empty((n + 7) // 8, dtype=torch.int64, device=device)
    draws = words.random_(-(2**63), None).view(torch.uint8)  # all 64 bits: 8 uniform bytes
    keep = torch.lt(draws[:n], lead, out=torch.empty_like(draws[:n]))  # 0/1 bytes
    # The ties (~n/256), in ascending order: found among the 8-byte words that hold one (a
    # scan of n/8 words instead of n bytes), then the bytes of those words.
    tie = torch.eq(draws, lead, out=torch.empty_like(draws))  # (8 · words,) 0/1 bytes
    hit = tie.view(torch.int64).nonzero().squeeze(1)  # words with a tied byte
    row, col = tie.view(-1, 8).index_select(0, hit).nonzero().unbind(1)  # bytes in those words
    tied = hit.index_select(0, row).mul_(8).add_(col)  # ascending
    if tied.numel() and tied[-1] >= n:  # a tie in the last word's padding bytes
        tied = tied[tied < n]
    if tied.numel():
        low = torch.empty(tied.numel(), dtype=torch.int64, device=device).random_()
        keep[tied] = (low.bitwise_and_((1 << rest_bits) - 1) < rest).to(torch.uint8)
    return keep.view(shape)


class LoraBranch(torch.autograd.Function):
    """``F.linear(F.linear(dropout(x), a), b) * scaling`` keeping x, a 1-byte mask and h.

    ``fast_mask`` True (what ``lean`` uses) draws `keep_mask`; False draws what ``nn.Dropout``
    draws on a CPU (``bernoulli_``): the same distribution, another stream. Under autocast the
    backward runs under the forward's autocast state (``custom_bwd``), so its products are bf16
    like autograd's."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")
    def forward(ctx, x, a, b, p: float, scaling: float, fast_mask: bool = False):
        if p > 0 and fast_mask:
            keep = keep_mask(x.shape, p, x.device)
            # 1/(1 − p) goes on the (N, r) product, not on the (N, d) dropped input: one pass
            # over the input fewer; the same numbers to float rounding
            h = F.linear(x * keep, a).mul_(1.0 / (1.0 - p))
        elif p > 0:
            noise = torch.empty_like(x).bernoulli_(1 - p)  # nn.Dropout's draws on a CPU
            noise.div_(1 - p)
            xd = x * noise
            keep = noise.ne(0).view(torch.uint8)  # 0/1 bytes, as `keep_mask` gives
            del noise
            h = F.linear(xd, a)
            del xd
        else:
            keep, h = None, F.linear(x, a)
        ctx.p, ctx.scaling = p, scaling
        # x is read only by A's gradient: a frozen A (--lora-a frozen/disjoint) keeps none
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, keep, h, a, b)
        ctx.x_shape = x.shape
        return F.linear(h, b).mul_(scaling)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, grad):
        x, keep, h, a, b = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])  # (N, out)
        h2 = h.reshape(-1, h.shape[-1])  # (N, r)
        x_shape = ctx.x_shape
        keep2 = keep.reshape(-1, x_shape[-1]) if keep is not None else None
        inv = 1.0 / (1.0 - ctx.p) if keep is not None else 1.0
        # The scalings (LoRA's s, dropout's 1/(1-p)) go on the (N, r) and (r, d) products, not on
        # the (N, d) tensors; each product keeps its thin side on the left or as a transposed
        # (r, d) matrix, which MKL runs 3-4x faster than (d, N) @ (N, r) or (N, d) @ (d, r)
        # (autograd's operand order). The same gradients to float rounding.
        grad_b = None
        if ctx.needs_input_grad[2]:
            grad_b = h2.t().mm(g).mul_(ctx.scaling).t()  # (out, r)
        gh = F.linear(g, b.t().contiguous()).mul_(ctx.scaling)  # (N, r) = s · g @ b
        grad_a = None
        if ctx.needs_input_grad[1]:
            x2 = x.reshape(-1, x_shape[-1])  # (N, in)
            xd = x2 * keep2 if keep2 is not None else x2  # dropout(x) · (1 − p)
            grad_a = gh.t().mm(xd)  # (r, in)
            if keep2 is not None:
                grad_a.mul_(inv)
            del xd
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (gh * inv if keep2 is not None else gh).mm(a)  # (N, in)
            if keep2 is not None:
                grad_x.mul_(keep2)
            grad_x = grad_x.reshape(x_shape)
        return grad_x, grad_a, grad_b, None, None, None


class SoftmaxNll(torch.autograd.Function):
    """Per-row NLL of ``targets`` under ``log_softmax(logits)``: ``F.cross_entropy(logits,
    targets, reduction="none")`` with a shorter backward.

    Autograd's backward for cross_entropy fills an N × V zero tensor, scatters the row
    gradients into it and runs the log-softmax backward over both (three passes over N × V and
    a new tensor). The gradient is g·(softmax − onehot): here the saved log-probabilities are
    exponentiated and scaled in place, then g is subtracted at the targets. Same forward
    bitwise; the gradient to float rounding. Its saved tensor is consumed: a second backward
    through the same graph (``retain_graph=True``) raises instead of giving wrong numbers."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # In fp32 whatever the logits' dtype, as autocast runs cross_entropy (its CPU autocast
        # leaves a bare log_softmax in bf16); the gradient goes back in the logits' dtype.
        logp = torch.log_softmax(logits.float(), dim=-1)  # (N, V)
        ctx.save_for_backward(logp, targets)
        ctx.consumed, ctx.logits_dtype = False, logits.dtype
        return -logp.gather(1, targets.unsqueeze(1)).squeeze(1)  # (N,)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if ctx.consumed:
            raise RuntimeError("SoftmaxNll's backward ran twice on one forward")
        ctx.consumed = True
        logp, targets = ctx.saved_tensors
        g = grad.to(logp.dtype).unsqueeze(1)  # (N, 1)
        probs = logp.exp_().mul_(g)  # g · softmax, in the saved tensor's memory
        probs.scatter_add_(1, targets.unsqueeze(1), -g)  # − g at each row's target
        return probs.to(ctx.logits_dtype), None


class HeadNll(torch.autograd.Function):
    """Per-row NLL of ``targets`` under ``log_softmax(F.linear(hidden, weight))``: a bias-free
    vocabulary projection and `SoftmaxNll` in one function, fp32.

    The logits are this function's own N × V tensor, so the log-softmax overwrites them: one
    N × V tensor per step instead of two (the projection's output and the log-softmax's, each
    ~130 MB at 650 counted positions and a 49k vocabulary, each a fresh allocation that the
    kernel zero-fills page by page). Forward and input gradient bitwise those of
    ``SoftmaxNll.apply(F.linear(hidden, weight), targets)``; the weight gradient is computed
    only when the weight needs one (the tied embeddings are frozen in LoRA training)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor):
        logp = F.linear(hidden, weight)  # (N, V)
        torch.log_softmax(logp, dim=-1, out=logp)  # in place: rows are read before written
        ctx.save_for_backward(logp, targets, hidden, weight)
        ctx.consumed = False
        return -logp.gather(1, targets.unsqueeze(1)).squeeze(1)  # (N,)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if ctx.consumed:
            raise RuntimeError("HeadNll's backward ran twice on one forward")
        ctx.consumed = True
        logp, targets, hidden, weight = ctx.saved_tensors
        g = grad.unsqueeze(1)  # (N, 1)
        probs = logp.exp_().mul_(g)  # g · softmax, in the saved tensor's memory
        probs.scatter_add_(1, targets.unsqueeze(1), -g)  # − g at each row's target
        grad_hidden = probs.mm(weight) if ctx.needs_input_grad[0] else None  # (N, H)
        grad_weight = probs.t().mm(hidden) if ctx.needs_input_grad[1] else None  # (V, H)
        return grad_hidden, grad_weight, None


def fused_head(head: nn.Module, hidden: torch.Tensor) -> bool:
    """Whether `HeadNll` can stand in for ``head`` and the loss: a plain bias-free fp32
    ``nn.Linear`` (not a LoRA-wrapped head) without hooks (HeadNll never calls the module, so
    a hook on it, e.g. `gradients.py` reading a targeted head, would not run), fp32 inputs, no
    autocast."""
    return (
        type(head) is nn.Linear
        and not (head._forward_hooks or head._forward_pre_hooks or head._backward_hooks)
        and head.bias is None
        and head.weight.dtype == torch.float32
        and hidden.dtype == torch.float32
        and not torch.is_autocast_enabled(hidden.device.type)
    )


def _lean_forward(layer, original, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """PEFT's ``Linear.forward`` for one active vanilla adapter in training; else the original."""
    adapters = [n for n in layer.active_adapters if n in layer.lora_A]
    amp = torch.is_autocast_enabled(x.device.type)  # only CPU bf16 autocast is taken over
    other_amp = amp and (
        x.device.type != "cpu" or torch.get_autocast_dtype("cpu") != torch.bfloat16
    )
    if (
        not layer.training
        or args
        or kwargs
        or layer.disable_adapters
        or layer.merged
        or len(adapters) != 1
        or adapters[0] in getattr(layer, "lora_variant", {})
        or other_amp
    ):
        return original(x, *args, **kwargs)
    name = adapters[0]
    dropout = layer.lora_dropout[name]
    p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
    result = layer.base_layer(x)
    dtype = result.dtype
    a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
    # fp32: PEFT's cast of x to the LoRA weights' dtype. bf16 autocast: x stays as it comes
    # (PEFT would cast it to fp32 for dropout and autocast back to bf16: two copies)
    xa = x if amp else x.to(a.dtype)
    branch = LoraBranch.apply(xa, a, b, p, layer.scaling[name], True)
    if branch.dtype == dtype:  # the base output is not saved for backward: add in place
        return result.add_(branch)
    return (result + branch).to(dtype)


def leanable(model: nn.Module) -> list[nn.Module]:
    """The PEFT LoRA ``Linear`` layers whose forward ``lean`` can take over."""
    from peft.tuners.lora.layer import Linear

    out = []
    for m in model.modules():
        if type(m) is not Linear or not isinstance(m.base_layer, nn.Linear):
            continue
        if any(not isinstance(d, (nn.Dropout, nn.Identity)) for d in m.lora_dropout.values()):
            continue
        out.append(m)
    return out


def _bind(layer: nn.Module, take_over) -> Callable[[], None]:
    """``layer.forward`` becomes ``take_over(layer, previous forward, x, ...)``; the returned
    function puts the previous one back (an enclosing block's binding, or the class's)."""
    original = layer.forward
    saved = layer.__dict__.get("forward")  # None: the class's forward

    def forward(x, *args, **kwargs):
        return take_over(layer, original, x, *args, **kwargs)

    layer.forward = forward

    def restore() -> None:
        if saved is None:
            del layer.forward
        else:
            layer.forward = saved

    return restore


@contextlib.contextmanager
def lean(model: nn.Module, enabled: bool = True):
    """Within the block, train through :class:`LoraBranch`, :class:`SwiGLU` and :class:`RMSNorm`
    where they apply.

    Yields the number of modules taken over; outside training mode they run their own forward.
    """
    layers = leanable(model) if enabled else []
    mlps = swiglu_mlps(model) if enabled else []
    norms = rms_norms(model) if enabled else []
    restores = [_bind(m, _lean_forward) for m in layers]
    for m in mlps:
        m.forward = types.MethodType(_swiglu_forward, m)
    classes = [type(m) for m in norms]
    for m, cls in zip(norms, classes, strict=True):
        m.__class__ = _lean_norm_class(cls)
    try:
        yield len(layers) + len(mlps) + len(norms)
    finally:
        for restore in reversed(restores):
            restore()
        for m in mlps:
            del m.forward  # back to the class's forward
        for m, cls in zip(norms, classes, strict=True):
            m.__class__ = cls


# --- evaluation: one product per LoRA module ---------------------------------------------------


def folded_weight(layer: nn.Module, name: str) -> torch.Tensor:
    """W + s·B·A (d_out, d_in) of a PEFT LoRA ``Linear`` for adapter ``name``."""
    a, b = layer.lora_A[name].weight, layer.lora_B[name].weight  # (r, in), (out, r)
    return torch.addmm(layer.base_layer.weight, b, a, alpha=layer.scaling[name])


def _folded_forward(layer, original, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """``x (W + s·B·A)ᵀ + bias`` for one active vanilla adapter, fp32, without autograd; else
    the forward it replaced."""
    adapters = [n for n in layer.active_adapters if n in layer.lora_A]
    if (
        torch.is_grad_enabled()
        or layer.training
        or args
        or kwargs
        or layer.disable_adapters
        or layer.merged
        or len(adapters) != 1
        or adapters[0] in getattr(layer, "lora_variant", {})
        or torch.is_autocast_enabled(x.device.type)
        or x.dtype != torch.float32
        or layer.base_layer.weight.dtype != torch.float32
        or layer.lora_A[adapters[0]].weight.dtype != torch.float32
        or getattr(layer, "fan_in_fan_out", False)  # W stored transposed
        or layer.lora_B[adapters[0]].bias is not None  # PEFT's lora_bias
    ):
        return original(x, *args, **kwargs)
    base = layer.base_layer
    return F.linear(x, folded_weight(layer, adapters[0]), base.bias)


@contextlib.contextmanager
def folded_lora(model: nn.Module, enabled: bool = True):
    """Within the block, each PEFT LoRA ``Linear`` evaluated in fp32 without autograd computes
    ``x (W + s·B·A)ᵀ`` with the folded weight made in that forward (`folded_weight`; one
    d_out×d_in temporary at a time, the model's weights untouched), instead of PEFT's
    ``x Wᵀ + s·(x Aᵀ) Bᵀ``: one product over the activations instead of three, and no
    scaling and add passes over the output. The same numbers to fp32 rounding (tested).

    Not under bf16: rounding W + s·B·A to bf16 would lose most of a small ΔW (bf16 keeps 8
    bits), so the bf16 path keeps PEFT's separate low-rank product. Yields the number of
    modules taken over."""
    restores = [_bind(m, _folded_forward) for m in (leanable(model) if enabled else [])]
    try:
        yield len(restores)
    finally:
        for restore in reversed(restores):
            restore()


# --- attention: fp32 where autograd runs it on a CPU ------------------------------------------

FP32_ATTENTION = "lorasum_sdpa_fp32_backward"


def _sdpa_fp32_backward(module, query, key, value, attention_mask, **kwargs):
    """Transformers' sdpa attention; with autograd on a CPU under bf16, run in fp32.

    PyTorch's CPU flash attention takes about twice as long forward + backward in bf16 as in
    fp32 (8 × 9 heads × 128 × 64, 2 cores, AMX Xeon: 31–39 ms vs 16 ms), while its bf16
    forward alone is the faster one; so only a pass that autograd records runs in fp32
    (inputs and output cast, the attention itself more precise than autocast's bf16)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if (
        torch.is_grad_enabled()
        and query.device.type == "cpu"
        and torch.is_autocast_enabled("cpu")
        and torch.get_autocast_dtype("cpu") == torch.bfloat16
    ):  # autocast would cast q, k, v (fp32 after the rotary embedding, or bf16) to bf16
        with torch.autocast("cpu", enabled=False):
            out, weights = sdpa_attention_forward(
                module, query.float(), key.float(), value.float(), attention_mask, **kwargs
            )
        return out.to(torch.bfloat16), weights  # the dtype autocast's attention returns
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


@contextlib.contextmanager
def fp32_attention_backward(model: nn.Module, enabled: bool = True):
    """Within the block, a model using transformers' ``sdpa`` attention uses
    `_sdpa_fp32_backward` instead (registered with transformers' attention and mask
    interfaces under `FP32_ATTENTION`; the mask is sdpa's). Yields whether it was switched."""
    config = getattr(model, "config", None)
    if not enabled or getattr(config, "_attn_implementation", None) != "sdpa":
        yield False
        return
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(FP32_ATTENTION, _sdpa_fp32_backward)
    AttentionMaskInterface.register(FP32_ATTENTION, sdpa_mask)
    configs = {id(c): c for c in _configs(model)}.values()
    saved = [(c, c._attn_implementation) for c in configs]
    for c, _ in saved:
        c._attn_implementation = FP32_ATTENTION
    try:
        yield True
    finally:
        for c, impl in saved:
            c._attn_implementation = impl


def _configs(model: nn.Module):
    """Every config object the model's modules hold (attention layers read their own)."""
    for m in model.modules():
        c = getattr(m, "config", None)
        if c is not None and hasattr(c, "_attn_implementation"):
            yield c
