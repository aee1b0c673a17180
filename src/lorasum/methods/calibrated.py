"""`calibrated` family: a handful of coefficients per module group, fitted on validation data
within a stated share of the compute of training the merged-data adapter.

Where the idea comes from: LoraHub (arXiv 2307.13269) fits one coefficient per adapter on a
few examples of the target task, gradient-free; LoRA Soups / CAT (arXiv 2410.13025) learns
per-layer coefficients of concatenated LoRAs and beats data mixing. Here the composed ΔW of a
module m in group g is

    ΔW_m = Σ_i c_{g,i} · ΔW_{i,m}          (i over the adapters; g = group of m)

with groups ``type`` (one per module type: q_proj, …, down_proj; the default, 5·N numbers on
the default model), ``layer``, ``module`` or ``global`` (one per adapter). It stays a LoRA:
B = [B_1 … B_N], A = [c_{g,1} s_1 A_1; …], rank Σr, never a dense matrix. The coefficients
start at 1 (the sum) and take a few Adam steps on the answer-only NLL of validation rows of
the combination's domains; nothing else is trained.

**Budget.** A step costs one forward and one backward over its rows through the whole
network (the gradient of a coefficient in layer 1 needs the backward of every later layer),
as a LoRA training step does; so compute is in proportion to tokens processed:
``fraction = fitted tokens / merged-data training tokens`` (every epoch's). `fit_coefficients`
stops before exceeding ``max_tokens`` (default: 1 % of the merged training's tokens, from
`coefficient_budget`) and reports the fraction it used. With 1 % the fit sees a few rows (e.g.
≈ 7 rows for 720 training rows and one epoch): it can set a few dozen scales, not more.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from lorasum.errors import LorasumError
from lorasum.factors import Factors, LoraFactors
from lorasum.settings import DataSettings

CATEGORY = "calibrated"
GRANULARITIES = ("type", "layer", "module", "global")
DEFAULT_FRACTION = 0.01


def group_of(module: str, granularity: str) -> str:
    """The coefficient group of a module: its type, layer, itself, or one global group."""
    if granularity == "type":
        return module.rsplit(".", 1)[-1]
    if granularity == "layer":
        digits = [p for p in module.split(".") if p.isdigit()]
        return digits[0] if digits else module
    if granularity == "module":
        return module
    if granularity == "global":
        return "all"
    raise LorasumError(
        f"unknown coefficient granularity {granularity!r}; choose one of: {', '.join(GRANULARITIES)}"
    )


def compose_with_coefficients(
    adapters: Sequence[Factors], coefficients: Mapping[str, Sequence[float]], granularity: str
) -> dict[str, LoraFactors]:
    """ΔW_m = Σ_i c_{g(m),i} ΔW_{i,m} as LoRA factors (rank Σr, scale 1), module by module."""
    out = {}
    for m in sorted(set().union(*(a.keys() for a in adapters))):
        c = coefficients[group_of(m, granularity)]
        Bs, As = [], []
        for i, a in enumerate(adapters):
            f = a.get(m)
            if f is not None:
                Bs.append(f.B.float())  # (d_out, r_i)
                As.append(float(c[i]) * f.scale * f.A.float())  # (r_i, d_in)
        out[m] = LoraFactors(A=torch.cat(As, 0), B=torch.cat(Bs, 1), scale=1.0)
    return out


def coefficient_budget(training_tokens: int, fraction: float = DEFAULT_FRACTION) -> int:
    """Tokens a fit may process: ``fraction`` of the merged-data training's token passes
    (``training_tokens``: every non-padding token its steps processed, all epochs; the
    adapter's lorasum.json records it as ``metrics.real_tokens``)."""
    if not 0 < fraction <= 1:
        raise LorasumError(f"the calibrated budget fraction must be in (0, 1], got {fraction}")
    return int(fraction * training_tokens)


@dataclass
class CoefficientFit:
    """What `fit_coefficients` found and what it cost."""

    coefficients: dict[str, list[float]]  # group -> one coefficient per adapter
    modules: dict[str, LoraFactors]  # the composed adapter
    granularity: str
    losses: list[float]  # per step: mean NLL per counted token of the step's rows (before it)
    steps: int
    rows: int  # rows processed (counting repeats)
    tokens: int  # tokens processed (non-padding, forward + backward each)
    max_tokens: int
    info: dict = field(default_factory=dict)


def _hook_modules(model: nn.Module, adapters: Sequence[Factors], index, coeffs: torch.Tensor):
    """Forward hooks adding Σ_i c_{g,i} s_i (x A_iᵀ) B_iᵀ to every adapted module's output."""
    handles = []
    device = next(model.parameters()).device
    for m in sorted(set().union(*(a.keys() for a in adapters))):
        terms = [
            (i, f.scale, f.A.float().to(device), f.B.float().to(device))
            for i, a in enumerate(adapters)
            if (f := a.get(m)) is not None
        ]
        g = index[m]

        def hook(module, args, output, terms=terms, g=g):
            x = args[0]
            extra = sum(coeffs[g, i] * s * ((x @ A.T) @ B.T) for i, s, A, B in terms)
            return output + extra.to(output.dtype)

        handles.append(model.get_submodule(m).register_forward_hook(hook))
    return handles


def _adam_steps(
    model: nn.Module,
    batches: Sequence,
    sizes: list[int],
    coeffs: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    max_tokens: int,
    max_steps: int | None,
) -> tuple[list[float], int, int, int]:
    """Adam steps on the answer-only NLL of ``batches`` (cycled, through the hooked model)
    until the next batch would pass ``max_tokens`` or ``max_steps`` are done;
    returns (losses, tokens, rows, steps)."""
    from lorasum.evaluate import token_nll

    device = next(model.parameters()).device
    losses: list[float] = []
    tokens = rows = steps = 0
    k = 0
    while max_steps is None or steps < max_steps:
        j = k % len(batches)
        if tokens + sizes[j] > max_tokens:
            break
        batch = batches[j].to(device)
        nll, counted = token_nll(model, batch)
        loss = nll.sum() / counted.sum().clamp(min=1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        tokens, rows, steps, k = (
            tokens + sizes[j],
            rows + batch.input_ids.shape[0],
            steps + 1,
            k + 1,
        )
    return losses, tokens, rows, steps


def fit_coefficients(
    model: nn.Module,
    adapters: Sequence[Factors],
    batches: Sequence,
    max_tokens: int,
    *,
    granularity: str = "type",
    lr: float = 0.05,
    max_steps: int | None = None,
) -> CoefficientFit:
    """Fit c_{g,i} (start: 1, the sum) by Adam on the answer-only NLL of ``batches``.

    ``model``: the base model (no adapter applied; its weights are not touched); ``batches``:
    `lorasum.data.Batch`es of validation rows of the combination's domains, cycled; the fit
    stops before processing more than ``max_tokens`` non-padding tokens (see
    `coefficient_budget`) or after ``max_steps``. At least one batch must fit the budget.
    """
    if not adapters:
        raise LorasumError("fit_coefficients needs at least one adapter")
    names = sorted(set().union(*(a.keys() for a in adapters)))
    groups = sorted({group_of(m, granularity) for m in names})
    index = {m: groups.index(group_of(m, granularity)) for m in names}
    device = next(model.parameters()).device
    coeffs = torch.ones(len(groups), len(adapters), device=device, requires_grad=True)
    optimizer = torch.optim.Adam([coeffs], lr=lr)
    sizes = [int(b.attention_mask.sum()) for b in batches]
    if not batches:
        raise LorasumError("no validation rows to fit the coefficients on; use more data")
    # A budget below the smallest batch takes no step: the coefficients stay 1 (the sum), and
    # the report says so (steps 0) instead of stopping a study.
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    handles = _hook_modules(model, adapters, index, coeffs)
    was_training = model.training
    model.eval()  # no dropout: the coefficients see the model as it will be used
    try:
        losses, tokens, rows, steps = _adam_steps(
            model, batches, sizes, coeffs, optimizer, max_tokens, max_steps
        )
    finally:
        for h in handles:
            h.remove()
        for p in frozen:
            p.requires_grad_(True)
        model.train(was_training)
    values = coeffs.detach().cpu()
    if not torch.isfinite(values).all():
        raise LorasumError("the coefficient fit diverged (NaN/inf); lower its learning rate")
    coefficients = {g: [float(v) for v in values[n]] for n, g in enumerate(groups)}
    return CoefficientFit(
        coefficients=coefficients,
        modules=compose_with_coefficients(adapters, coefficients, granularity),
        granularity=granularity,
        losses=losses,
        steps=steps,
        rows=rows,
        tokens=tokens,
        max_tokens=max_tokens,
        info={
            "lr": lr,
            "groups": len(groups),
            "coefficients": values.numel(),
            **(
                {"note": "budget below one validation batch: no step, the sum"} if not steps else {}
            ),
        },
    )


def budget_report(fit: CoefficientFit, training_tokens: int) -> dict:
    """The fit's compute as a share of the merged-data training (token passes, fwd + bwd)."""
    return {
        "category": CATEGORY,
        "tokens": fit.tokens,
        "rows": fit.rows,
        "steps": fit.steps,
        "merged_training_tokens": training_tokens,
        "fraction": fit.tokens / training_tokens if training_tokens > 0 else math.nan,
        "max_tokens": fit.max_tokens,
        "coefficients": fit.info["coefficients"],
    }


def _interleaved_batches(
    tokenizer, sources: Sequence, max_length: int, batch_size: int, rows: int | None = None
) -> list:
    """Validation batches of ``sources`` (their "val" split; the first ``rows`` of each when
    given), rows interleaved across domains so that a short budget sees every domain."""
    from lorasum.data.token_cache import tokenize_cached
    from lorasum.data.tokenize import make_batches

    per_source = [tokenize_cached(tokenizer, [s], "val", max_length)[:rows] for s in sources]
    interleaved = [
        (item, d)
        for row in range(max(len(p) for p in per_source))
        for d, p in enumerate(per_source)
        if row < len(p)
        for item, _ in [p[row]]
    ]
    return [
        make_batches(interleaved[s : s + batch_size], batch_size, tokenizer.pad_token_id, False)[0]
        for s in range(0, len(interleaved), batch_size)
    ]


def fit_calibrated(
    model: nn.Module,
    tokenizer,
    adapters: Sequence[Factors],
    val_sources: Sequence,
    training_tokens: int,
    *,
    fraction: float = DEFAULT_FRACTION,
    max_length: int = DataSettings.max_length,
    batch_size: int = 2,
    granularity: str = "type",
    lr: float = 0.05,
) -> tuple[CoefficientFit, dict]:
    """One call for a study: validation batches of ``val_sources`` (`lorasum.data.Source`,
    their "val" split, rows interleaved across domains so that a short budget sees every
    domain), the budget from the merged-data training's tokens, the fit and its report."""
    batches = _interleaved_batches(tokenizer, val_sources, max_length, batch_size)
    budget = coefficient_budget(training_tokens, fraction)
    fit = fit_coefficients(model, adapters, batches, budget, granularity=granularity, lr=lr)
    return fit, budget_report(fit, training_tokens)


LEARNED_DEFAULTS = {"rows": 64, "epochs": 4, "granularity": "layer", "lr": 0.05}


def learned_options_problem(options: Mapping) -> str | None:
    """What is wrong with the `learned` method's options (None: nothing); one line."""
    unknown = set(options) - set(LEARNED_DEFAULTS)
    if unknown:
        return f"unknown options {sorted(unknown)} (known: {', '.join(LEARNED_DEFAULTS)})"
    o = {**LEARNED_DEFAULTS, **options}
    for name in ("rows", "epochs"):
        if not isinstance(o[name], int) or isinstance(o[name], bool) or o[name] < 1:
            return f"{name} {o[name]!r}: use a whole number >= 1"
    if o["granularity"] not in GRANULARITIES:
        return f"granularity {o['granularity']!r}: use one of {', '.join(GRANULARITIES)}"
    if not isinstance(o["lr"], int | float) or not o["lr"] > 0:
        return f"lr {o['lr']!r}: use a learning rate > 0"
    return None


def fit_learned(
    model: nn.Module,
    tokenizer,
    adapters: Sequence[Factors],
    sources: Sequence,
    training_tokens: int,
    *,
    rows: int = LEARNED_DEFAULTS["rows"],
    epochs: int = LEARNED_DEFAULTS["epochs"],
    granularity: str = LEARNED_DEFAULTS["granularity"],
    lr: float = LEARNED_DEFAULTS["lr"],
    max_length: int = DataSettings.max_length,
    batch_size: int = 4,
) -> tuple[CoefficientFit, dict]:
    """The `learned` method: per-layer (``granularity``) per-adapter coefficients, starting at
    the sum, fitted by Adam on the answer-only NLL of the first ``rows`` validation rows of each
    adapter's own domain (``sources``, one per adapter; never a test split), ``epochs`` passes
    over them. Its cost is reported as a share of the merged-data training's tokens
    (``training_tokens``; 0 when there is none to compare with)."""
    problem = learned_options_problem(
        {"rows": rows, "epochs": epochs, "granularity": granularity, "lr": lr}
    )
    if problem is not None:
        raise LorasumError(f"method learned: {problem}")
    batches = _interleaved_batches(tokenizer, sources, max_length, batch_size, rows)
    if not batches:
        raise LorasumError("method learned: the adapters' domains have no validation rows")
    fit = fit_coefficients(
        model,
        adapters,
        batches,
        2**62,
        granularity=granularity,
        lr=lr,
        max_steps=epochs * len(batches),
    )
    report = {
        **budget_report(fit, training_tokens),
        "category": CATEGORY,
        "method": "learned",
        "split": "val",
        "rows_per_domain": {s.name: min(rows, len(s.splits["val"])) for s in sources},
        "epochs": epochs,
        "granularity": granularity,
        "lr": lr,
    }
    report.pop("max_tokens")
    return fit, report
