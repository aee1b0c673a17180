"""Routing instead of adding: each input goes to one of the single-domain adapters.

A route chooses, per test row, which single adapter scores it; the adapters are never added.
- ``oracle``: each row's own domain's adapter (the upper bound; computed from the singles'
  evaluations, `oracle_from_singles`).
- ``nearest``: a prompt-level router that stays modular. Each adapter carries a centroid of its
  own domain's training prompts (``Question: …\\nAnswer:``): the mean over rows of the base
  model's mean last-layer hidden state over the prompt tokens, normalised (`prompt_centroid`,
  no other domain's data); a row goes to the adapter whose centroid has the highest cosine with
  its own prompt's mean hidden state (`route`, hard top-1).
- ``gaussian``: the same modular idea with a density in place of a direction. Each adapter
  carries the mean and the per-dimension variance of the same prompt vectors over its domain's
  first `GAUSSIAN_PROMPTS` training prompts (`prompt_gaussian`, 2·H floats); a row goes to the
  adapter under whose diagonal Gaussian its prompt vector is likeliest (`route_gaussian`, hard
  top-1). Chosen over cosine-to-centroid on the realistic study's validation rows (fewer
  routing errors with a sixth of the prompts: docs/BUDGETS.md).
- ``mixture``: ``gaussian``'s summaries, but soft: a row's answer is scored by the mixture
  Σₖ wₖ·pₖ(answer | prompt) of the adapters, with wₖ the router's posterior softmax(score /
  `MIXTURE_TEMPERATURE`) and weights under `MIXTURE_FLOOR` dropped (`mixture_weights`), so a
  row the router is sure of costs one adapter's forward and an unsure one hedges instead of
  paying a wrong adapter's full loss (`mixture_nll`, `evaluate_mixture`). Served as a
  per-request mix of the next-token distributions of the adapters kept, each weight updated
  by the answer tokens so far (Bayes' rule on the same mixture).
- ``arrow``: PEFT's Arrow (arXiv 2405.11157, `peft.create_arrow_model`), data-free and per
  token inside every LoRA layer: each adapter's prototype is the top right singular vector of
  its ΔW = B·A in that layer; a token's hidden state x gets |⟨x, prototype⟩| per adapter, the
  top_k of them are softmaxed (temperature) and the adapters' outputs mixed with those weights.
  No per-row choice, so no routing accuracy (`arrow_model`, `evaluate_arrow`).

`evaluate_routed` scores every row with the adapter it is routed to (the adapters loaded once
into one PeftModel, `set_adapter` per group of rows), token-weighted like `evaluate_batches`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lorasum.data.sources import QA, Source
from lorasum.data.token_cache import tokenize_cached
from lorasum.data.tokenize import make_batches, prompt_text
from lorasum.errors import LorasumError
from lorasum.evaluate import (
    autocast_context,
    evaluate_batches,
    perplexity_from,
    row_nlls,
    unwrap,
)
from lorasum.settings import DataSettings

# The gaussian router's summary: a domain's first 64 training prompts (the seeded split's
# order), and a variance floor of 1e-3 × the domain's mean variance so that no dimension's
# variance is zero. Both chosen on the realistic study's validation rows (docs/BUDGETS.md).
GAUSSIAN_PROMPTS = 64
GAUSSIAN_FLOOR = 1e-3
# The mixture's posterior temperature on the gaussian log-likelihoods (which, summed over H
# dimensions treated as independent, are far too sure), and the weight below which an adapter
# is dropped from a row's mixture (then not run for it). Chosen on the realistic study's
# validation rows (8 pair × seed cells; docs/BUDGETS.md): 0.31 % mean perplexity gap to the
# oracle (hard top-1: 1.67 %) for 1.10 adapter forwards per row.
MIXTURE_TEMPERATURE = 30.0
MIXTURE_FLOOR = 0.05


# Registered routes: name → what it does (a study's `routes` option; an unknown name lists these)
ROUTES: dict[str, str] = {
    "oracle": "each test row scored by its own domain's single adapter (the upper bound)",
    "nearest": "each test row sent to the single adapter whose training-prompt centroid has "
    "the highest cosine with the row's prompt (base model's mean last-layer hidden state)",
    "gaussian": "each test row sent to the single adapter under whose diagonal Gaussian of its "
    f"first {GAUSSIAN_PROMPTS} training prompts' base-model hidden states the row's prompt is "
    "likeliest",
    "mixture": "each test row scored by the mixture of the single adapters' answer "
    "likelihoods weighted by the gaussian router's tempered posterior (adapters under "
    f"{MIXTURE_FLOOR:g} weight dropped)",
    "arrow": "PEFT's Arrow: per token and LoRA layer, the adapters whose ΔW's top right singular "
    "vector aligns with the hidden state mixed by a softmax (data-free; all adapters, top_k = K)",
}


def prompt_ids(tokenizer, question: str, max_length: int) -> list[int]:
    """The prompt's token ids (``Question: …\\nAnswer:``), cut from the left at ``max_length``
    with a leading BOS kept, as `data.tokenize_qa` cuts a long prompt."""
    ids = tokenizer(prompt_text(question), add_special_tokens=True)["input_ids"]
    if len(ids) <= max_length:
        return ids
    bos = tokenizer.bos_token_id
    head = ids[:1] if bos is not None and ids[:1] == [bos] else []
    return head + ids[len(ids) - (max_length - len(head)) :]


def _questions(source_or_items, split: str) -> list[str]:
    if isinstance(source_or_items, Source):
        return [qa.question for qa in source_or_items.splits[split]]
    return [x.question if isinstance(x, QA) else str(x) for x in source_or_items]


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the unmasked positions of each row: (B, T, H), (B, T) → (B, H) float32."""
    m = mask.to(torch.float32).unsqueeze(-1)  # (B, T, 1)
    return (hidden.float() * m).sum(1) / m.sum(1).clamp_min(1.0)


@torch.inference_mode()
def prompt_vectors(
    model: nn.Module,
    tokenizer,
    source_or_items,
    max_length: int,
    split: str = "train",
    batch_size: int = 32,
    amp_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Each row's mean last-layer hidden state over its prompt tokens: (N, H) float32, in the
    rows' order. ``model``'s adapters (if it is a PeftModel) are disabled: the base model's."""
    questions = _questions(source_or_items, split)
    hf = unwrap(model)
    device = next(hf.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    disable = getattr(model, "disable_adapter", None)
    was_training = hf.training
    hf.eval()
    out = []
    try:
        with disable() if callable(disable) else torch.no_grad():
            for s in range(0, len(questions), batch_size):
                rows = [prompt_ids(tokenizer, q, max_length) for q in questions[s : s + batch_size]]
                T = max(len(r) for r in rows)
                ids = torch.full((len(rows), T), pad, dtype=torch.long)
                mask = torch.zeros((len(rows), T), dtype=torch.long)
                for i, r in enumerate(rows):
                    ids[i, : len(r)] = torch.tensor(r)
                    mask[i, : len(r)] = 1
                ids, mask = ids.to(device), mask.to(device)
                with autocast_context(device, amp_dtype):
                    hidden = hf.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
                out.append(masked_mean(hidden, mask).cpu())  # (B, H)
    finally:
        hf.train(was_training)
    if not out:
        return torch.zeros(0, hf.config.hidden_size)
    return torch.cat(out)


def prompt_centroid(
    model: nn.Module,
    tokenizer,
    source_or_items,
    max_length: int,
    split: str = "train",
    batch_size: int = 32,
    amp_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """A domain's router summary: the mean over its rows (a Source's ``split``, or QA items /
    questions) of each prompt's mean last-layer hidden state, normalised: (H,) float32."""
    vectors = prompt_vectors(
        model, tokenizer, source_or_items, max_length, split, batch_size, amp_dtype
    )  # (N, H)
    return F.normalize(vectors.mean(0), dim=0)


def route(prompt_vecs: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Hard top-1: each row's index of the centroid with the highest cosine; (N, H), (K, H) →
    (N,) long. Ties go to the lowest index (argmax's first maximum)."""
    cos = F.normalize(prompt_vecs.double(), dim=1) @ F.normalize(centroids.double(), dim=1).T
    return cos.argmax(dim=1)  # (N,)


def gaussian_of(vectors: torch.Tensor) -> torch.Tensor:
    """A diagonal Gaussian of prompt vectors: (N, H) → (2, H) float32, [mean, unbiased
    variance] (variance 0 where N = 1)."""
    v = vectors.double()
    var = v.var(0, unbiased=True) if len(v) > 1 else torch.zeros_like(v[0])
    return torch.stack([v.mean(0), var]).float()


def prompt_gaussian(
    model: nn.Module,
    tokenizer,
    source_or_items,
    max_length: int,
    split: str = "train",
    prompts: int = GAUSSIAN_PROMPTS,
    batch_size: int = 32,
    amp_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """A domain's ``gaussian`` router summary: `gaussian_of` the prompt vectors of its first
    ``prompts`` rows (a Source's ``split``, or QA items / questions): (2, H) float32."""
    questions = _questions(source_or_items, split)[:prompts]
    vectors = prompt_vectors(model, tokenizer, questions, max_length, split, batch_size, amp_dtype)
    return gaussian_of(vectors)


def gaussian_scores(prompt_vecs: torch.Tensor, gaussians: torch.Tensor) -> torch.Tensor:
    """Each row's log-likelihood under each adapter's diagonal Gaussian, up to the constant
    −H/2·log 2π: (N, H), (K, 2, H) → (N, K) float64. Each variance is floored at
    `GAUSSIAN_FLOOR` × its own mean (the summaries never mix)."""
    x = prompt_vecs.double().unsqueeze(1)  # (N, 1, H)
    mu, var = gaussians.double().unbind(1)  # (K, H) each
    var = var + GAUSSIAN_FLOOR * var.mean(1, keepdim=True)  # (K, H)
    return -0.5 * (((x - mu) ** 2) / var + var.log()).sum(-1)  # (N, K)


def route_gaussian(prompt_vecs: torch.Tensor, gaussians: torch.Tensor) -> torch.Tensor:
    """Hard top-1 by likelihood: (N, H), (K, 2, H) → (N,) long; ties to the lowest index."""
    return gaussian_scores(prompt_vecs, gaussians).argmax(dim=1)


def router_tokens(tokenizer, source: Source, max_length: int, prompts: int | None = None) -> int:
    """Prompt tokens a router summary reads forward: the first ``prompts`` (None: every)
    training prompts of ``source``, cut as `prompt_ids` cuts them."""
    rows = source.splits["train"][:prompts]
    return sum(len(prompt_ids(tokenizer, qa.question, max_length)) for qa in rows)


def mixture_weights(
    scores: torch.Tensor, temperature: float = MIXTURE_TEMPERATURE, floor: float = MIXTURE_FLOOR
) -> torch.Tensor:
    """The router's posterior over adapters, softmax(scores / temperature) per row, with the
    weights under ``floor`` dropped (the top one always kept) and the rest renormalised:
    (N, K) → (N, K) float64, each row summing to 1."""
    w = torch.softmax(scores.double() / temperature, dim=1)  # (N, K)
    top = F.one_hot(w.argmax(1), w.shape[1]).bool()
    w = torch.where((w >= floor) | top, w, torch.zeros_like(w))
    return w / w.sum(1, keepdim=True)


def mixture_nll(nll: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Each row's NLL under the mixture Σₖ wₖ·pₖ(answer): −log Σₖ wₖ·exp(−nllₖ), from the
    adapters' summed answer NLLs (N, K) and the weights (N, K); adapters of weight 0 are left
    out (their NLL may be anything, NaN included): → (N,) float64."""
    kept = weights > 0
    terms = torch.where(kept, weights.double().log() - nll.double(), -torch.inf)  # (N, K)
    return -torch.logsumexp(terms, dim=1)


def oracle_from_singles(per_domain: Mapping[str, Mapping]) -> dict:
    """The oracle route from each domain's single adapter on its own test rows ({domain:
    {nll, tokens}}): NLL and tokens summed, perplexity exp(NLL / tokens), accuracy 100 %."""
    nll = sum(float(v["nll"]) for v in per_domain.values())
    tokens = sum(int(v["tokens"]) for v in per_domain.values())
    return {
        "perplexity": perplexity_from(nll, tokens),
        "nll": nll,
        "tokens": tokens,
        "routing_accuracy": 100.0,
    }


def routing_summary(truth: Sequence[int], chosen: Sequence[int], names: Sequence[str]) -> dict:
    """Share of rows (in %) routed to their own domain's adapter, and the confusion counts
    {true domain: {adapter: rows}}."""
    confusion = {d: {a: 0 for a in names} for d in names}
    for t, c in zip(truth, chosen, strict=True):
        confusion[names[t]][names[c]] += 1
    right = sum(int(t == c) for t, c in zip(truth, chosen, strict=True))
    accuracy = 100.0 * right / len(truth) if len(truth) else float("nan")
    return {"routing_accuracy": accuracy, "confusion": confusion}


def _routed_items(tokenizer, adapters, sources, split, max_length, answer_only):
    """The domains (adapters' order, which ``sources`` must share), their sources and the
    tokenised rows of ``split`` ([(row, domain index)], the order every route scores in)."""
    names = list(adapters)
    if list(sources) != names:
        raise ValueError(f"adapters {names} and sources {list(sources)} name other domains")
    srcs = [sources[d] for d in names]
    return names, srcs, tokenize_cached(tokenizer, srcs, split, max_length, answer_only)


def _split_vectors(model, tokenizer, srcs, split, max_length, batch_size, amp_dtype):
    """`prompt_vectors` of every row of the sources' ``split``, in `_routed_items`' order."""
    qa = [qa for s in srcs for qa in s.splits[split]]
    return prompt_vectors(
        model, tokenizer, qa, max_length, batch_size=batch_size, amp_dtype=amp_dtype
    )


@contextlib.contextmanager
def _all_adapters(model: nn.Module, adapters: Mapping[str, str | Path]):
    """One PeftModel over ``model`` with every adapter loaded under its domain's name;
    unloaded afterwards (``model`` left as it was)."""
    from peft import PeftModel

    names = list(adapters)
    net = PeftModel.from_pretrained(model, str(adapters[names[0]]), adapter_name=names[0])
    try:
        for name in names[1:]:
            net.load_adapter(str(adapters[name]), adapter_name=name)
        yield net
    finally:
        net.unload()


def evaluate_routed(
    model: nn.Module,
    tokenizer,
    adapters: Mapping[str, str | Path],
    sources: Mapping[str, Source],
    max_length: int,
    centroids: torch.Tensor | None = None,
    assignment: Sequence[int] | None = None,
    gaussians: torch.Tensor | None = None,
    split: str = "test",
    answer_only: bool = DataSettings.answer_only,
    batch_size: int = 32,
    amp_dtype: torch.dtype | None = None,
) -> dict:
    """Every row of ``sources``' ``split`` scored with the adapter it is routed to.

    ``adapters`` and ``sources`` are keyed by domain, in the same order (a domain's own
    adapter is ``adapters[domain]``). The route: ``assignment`` (an adapter index per row, in
    the rows' order) if given, else `route` of each prompt against ``centroids`` (K, H), one
    per adapter, or `route_gaussian` against ``gaussians`` (K, 2, H). Returns an evaluation's shape (perplexity, nll, tokens, per_dataset, timing)
    with ``routing_accuracy`` (%) and ``confusion``. ``model`` is left as it was."""
    t0 = time.perf_counter()
    names, srcs, items = _routed_items(tokenizer, adapters, sources, split, max_length, answer_only)
    truth = [d for _, d in items]
    if assignment is None:
        if (centroids is None) == (gaussians is None):
            raise ValueError("give centroids or gaussians (one per adapter), or the assignment")
        vecs = _split_vectors(model, tokenizer, srcs, split, max_length, batch_size, amp_dtype)
        chosen = route(vecs, centroids) if gaussians is None else route_gaussian(vecs, gaussians)
        assignment = chosen.tolist()
    assignment = [int(a) for a in assignment]
    if len(assignment) != len(items):
        raise ValueError(f"{len(assignment)} routes for {len(items)} rows")
    device = next(model.parameters()).device
    nll = torch.zeros(len(names), dtype=torch.float64)
    tokens = torch.zeros(len(names), dtype=torch.long)
    with _all_adapters(model, adapters) as net:
        for k, name in enumerate(names):
            rows = [items[i] for i, a in enumerate(assignment) if a == k]
            if not rows:
                continue
            net.set_adapter(name)
            batches = make_batches(rows, batch_size, tokenizer.pad_token_id, shuffle=False)
            part = evaluate_batches(net, batches, names, device, amp_dtype)
            for i, d in enumerate(names):
                nll[i] += part["per_dataset"][d]["nll"]
                tokens[i] += part["per_dataset"][d]["tokens"]
    total_nll, total_tokens = float(nll.sum()), int(tokens.sum())
    return {
        "timing": {"seconds": time.perf_counter() - t0},
        "perplexity": perplexity_from(total_nll, total_tokens),
        "nll": total_nll,
        "tokens": total_tokens,
        "per_dataset": {
            d: {
                "perplexity": perplexity_from(float(nll[i]), int(tokens[i])),
                "nll": float(nll[i]),
                "tokens": int(tokens[i]),
            }
            for i, d in enumerate(names)
        },
        **routing_summary(truth, assignment, names),
    }


def evaluate_mixture(
    model: nn.Module,
    tokenizer,
    adapters: Mapping[str, str | Path],
    sources: Mapping[str, Source],
    max_length: int,
    gaussians: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    temperature: float = MIXTURE_TEMPERATURE,
    floor: float = MIXTURE_FLOOR,
    split: str = "test",
    answer_only: bool = DataSettings.answer_only,
    batch_size: int = 32,
    amp_dtype: torch.dtype | None = None,
) -> dict:
    """Every row of ``sources``' ``split`` scored by the mixture of the adapters (keyed by
    domain like `evaluate_routed`'s): `mixture_nll` with ``weights`` (N, K) if given, else
    `mixture_weights` of `gaussian_scores` against ``gaussians`` (K, 2, H). Each adapter runs
    only on the rows that keep it. Returns an evaluation's shape with ``routing_accuracy``
    and ``confusion`` (of each row's top weight), ``mixed_rows`` (% of rows scored by more
    than one adapter) and ``adapter_rows`` (adapter forwards per row, ≥ 1). ``model`` is left
    as it was."""
    t0 = time.perf_counter()
    names, srcs, items = _routed_items(tokenizer, adapters, sources, split, max_length, answer_only)
    if weights is None:
        if gaussians is None:
            raise ValueError("give gaussians (one per adapter) or the weights")
        vecs = _split_vectors(model, tokenizer, srcs, split, max_length, batch_size, amp_dtype)
        weights = mixture_weights(gaussian_scores(vecs, gaussians), temperature, floor)
    if tuple(weights.shape) != (len(items), len(names)):
        raise ValueError(f"weights {tuple(weights.shape)} for {len(items)} rows × {len(names)}")
    device = next(model.parameters()).device
    nll = torch.full(tuple(weights.shape), torch.nan, dtype=torch.float64)  # (N, K)
    tokens = torch.zeros(len(items), dtype=torch.long)
    with _all_adapters(model, adapters) as net:
        for k, name in enumerate(names):
            rows = (weights[:, k] > 0).nonzero().flatten()
            if len(rows) == 0:
                continue
            net.set_adapter(name)
            part = [items[i] for i in rows.tolist()]
            nll[rows, k], tokens[rows] = row_nlls(
                net, part, batch_size, tokenizer.pad_token_id, device, amp_dtype
            )
    mixed = mixture_nll(nll, weights)  # (N,)
    truth = torch.tensor([d for _, d in items], dtype=torch.long)
    per = {
        d: (float(mixed[truth == i].sum()), int(tokens[truth == i].sum()))
        for i, d in enumerate(names)
    }
    total_nll, total_tokens = float(mixed.sum()), int(tokens.sum())
    kept = (weights > 0).sum(1)
    return {
        "timing": {"seconds": time.perf_counter() - t0},
        "perplexity": perplexity_from(total_nll, total_tokens),
        "nll": total_nll,
        "tokens": total_tokens,
        "per_dataset": {
            d: {"perplexity": perplexity_from(n, t), "nll": n, "tokens": t}
            for d, (n, t) in per.items()
        },
        **routing_summary(truth.tolist(), weights.argmax(1).tolist(), names),
        "mixed_rows": 100.0 * float((kept > 1).double().mean()) if len(items) else 0.0,
        "adapter_rows": float(kept.double().mean()) if len(items) else 0.0,
    }


# --- arrow: PEFT's per-token router over the adapters' own singular directions ---------------

ARROW_TEMPERATURE = 1.0  # PEFT's default router_temperature
ARROW_SEED = 0  # seeds the prototypes' power iteration (PEFT's default, None, is not repeatable)


def arrow_options(
    n_adapters: int,
    top_k: int | None = None,
    temperature: float = ARROW_TEMPERATURE,
    rng_seed: int = ARROW_SEED,
) -> dict:
    """PEFT's `ArrowConfig` arguments for ``n_adapters`` adapters, checked: ``top_k`` (default:
    all of them, as a study's ``arrow`` route runs), ``router_temperature``, ``rng_seed``."""
    k = n_adapters if top_k is None else top_k
    problems = []
    if n_adapters < 1:
        problems.append("give at least one adapter")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= max(n_adapters, 1):
        problems.append(f"top_k {k!r} must be an integer from 1 to the {n_adapters} adapters")
    if not temperature > 0:
        problems.append(f"temperature {temperature!r} must be positive")
    if problems:
        raise LorasumError("arrow: " + "; ".join(problems))
    return {"top_k": k, "router_temperature": float(temperature), "rng_seed": int(rng_seed)}


def check_arrow_adapters(paths: Sequence[str | Path], model: nn.Module) -> None:
    """Refuse, in one line, adapters PEFT's Arrow cannot mix or would mix wrongly: anything but
    plain LoRA on linear modules (DoRA magnitudes, LoRA bias, embedding LoRA, modules_to_save:
    Arrow reads only lora_A/lora_B, so PEFT would drop them silently), adapters that adapt
    other modules or with other ranks (PEFT stacks them per layer), and adapters that skip some
    modules of a name (PEFT puts the router on every module of each targeted name, e.g. every
    layer's ``q_proj``, and fails there)."""
    from lorasum.adapters import check_compatible, check_fits, delta_shape, read_adapter

    adapters = [read_adapter(p, strict=True) for p in paths]  # plain LoRA only, else one line
    check_compatible(adapters)
    first = adapters[0]
    model_name = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "the model")
    for a in adapters:
        check_fits(a, model, model_name)
        if a.modules.keys() != first.modules.keys():
            only = sorted(a.modules.keys() ^ first.modules.keys())
            raise LorasumError(
                f"arrow: adapters {first.path} and {a.path} adapt different modules (e.g. "
                f"{only[0]}); Arrow mixes adapters module by module: route adapters trained "
                "with the same target modules"
            )
        ranks = [(m, first.modules[m].rank, f.rank) for m, f in a.modules.items()]
        other = [x for x in ranks if x[1] != x[2]]
        if other:
            m, r0, r1 = other[0]
            raise LorasumError(
                f"arrow: {m} has rank {r0} in {first.path} but {r1} in {a.path}; PEFT's Arrow "
                "stacks the adapters' factors per layer: route adapters of one rank"
            )
    names = {m.rsplit(".", 1)[-1] for m in first.modules}
    reached = {
        n
        for n, module in model.named_modules()
        if n.rsplit(".", 1)[-1] in names and delta_shape(module) is not None
    }
    skipped = sorted(reached - first.modules.keys())
    if skipped:
        raise LorasumError(
            f"arrow: adapter {first.path} leaves {skipped[0]} (and {len(skipped) - 1} more) "
            "without LoRA while adapting other modules of that name; PEFT's Arrow routes on "
            "every module of each targeted name: route adapters that adapt every layer"
        )


def _strip_lora(model: nn.Module) -> None:
    """Put back the base layers where PEFT injected LoRA layers into ``model`` (after a failed
    `create_arrow_model`, which has no model to `unload` yet)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            parent, _, child = name.rpartition(".")
            setattr(
                model.get_submodule(parent) if parent else model, child, module.get_base_layer()
            )
    if "peft_config" in vars(model):
        del model.peft_config


@torch.no_grad()
def arrow_model(
    model: nn.Module,
    adapters: Sequence[str | Path],
    top_k: int | None = None,
    temperature: float = ARROW_TEMPERATURE,
    rng_seed: int = ARROW_SEED,
):
    """PEFT's Arrow over ``adapters`` (PEFT directories) on ``model`` (a PeftModel whose active
    adapter is ``arrow_router``; `unload` it to get ``model`` back). The prototypes are built
    here, in float32 from the loaded factors, so they do not depend on the evaluation's
    precision (PEFT would build them lazily in the first forward's dtype)."""
    from peft import ArrowConfig, create_arrow_model

    options = arrow_options(len(adapters), top_k, temperature, rng_seed)
    check_arrow_adapters(adapters, model)
    try:
        net = create_arrow_model(model, [str(p) for p in adapters], ArrowConfig(**options))
    except (ValueError, TypeError, KeyError) as e:  # what PEFT refuses beyond our checks
        _strip_lora(model)
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LorasumError(
            f"arrow: PEFT's create_arrow_model refuses {[str(p) for p in adapters]} ({why}); "
            "route plain LoRA adapters of one rank on the same linear modules"
        ) from None
    for module in net.modules():
        for router in getattr(module, "lora_arrow", {}).values():
            router.gen_know_sub(module.lora_A, module.lora_B)  # nothing without use_gks
            router.build_prototypes(module.lora_A, module.lora_B)  # (K, d_in)
    return net.eval()


def evaluate_arrow(
    model: nn.Module,
    tokenizer,
    adapters: Mapping[str, str | Path],
    sources: Mapping[str, Source],
    max_length: int,
    split: str = "test",
    answer_only: bool = DataSettings.answer_only,
    batch_size: int = 32,
    amp_dtype: torch.dtype | None = None,
    top_k: int | None = None,
    temperature: float = ARROW_TEMPERATURE,
    rng_seed: int = ARROW_SEED,
) -> dict:
    """Every row of ``sources``' ``split`` scored through PEFT's Arrow over ``adapters`` (keyed
    by domain like `evaluate_routed`'s; batches and token weighting as `evaluate_batches`).
    Returns an evaluation's shape with ``routing_accuracy`` None (Arrow mixes adapters per
    token and layer; PEFT keeps no per-token weights) and the ``arrow`` options used.
    ``model`` is left as it was."""
    t0 = time.perf_counter()
    names, _, items = _routed_items(tokenizer, adapters, sources, split, max_length, answer_only)
    options = arrow_options(len(names), top_k, temperature, rng_seed)
    device = next(model.parameters()).device
    net = arrow_model(model, [adapters[d] for d in names], **_arrow_kwargs(options))
    try:
        batches = make_batches(items, batch_size, tokenizer.pad_token_id, shuffle=False)
        result = evaluate_batches(net, batches, names, device, amp_dtype)
    finally:
        net.unload()
    result["timing"]["seconds"] = time.perf_counter() - t0
    return {**result, "routing_accuracy": None, "arrow": options}


def _arrow_kwargs(options: Mapping) -> dict:
    return {
        "top_k": options["top_k"],
        "temperature": options["router_temperature"],
        "rng_seed": options["rng_seed"],
    }
