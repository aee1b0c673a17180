"""Token-weighted negative log-likelihood and perplexity on counted (answer) tokens only; task
accuracy (acc / acc_norm over options, exact match of greedy answers) beside it.

perplexity = exp(Σ NLL over counted tokens / number of counted tokens), summed across batches,
so batch size and padding never change the result. Accuracy's conventions and math live in
`lorasum.accuracy`; its model passes (`option_logliks`, `greedy_answers`) run here under the same
precision and `inference_context` as perplexity.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lorasum.accuracy import (
    DEFAULT_MAX_NEW_TOKENS,
    Tally,
    cut_left,
    exact_match,
    first_line,
    pick,
    prompt_ids,
    question_groups,
    row_kind,
    tokenize_choice,
)
from lorasum.data.sources import QA
from lorasum.data.tokenize import Batch, Tokenized, collate, make_batches
from lorasum.errors import raise_all
from lorasum.models.precision import frozen_linears_as, norm_outputs_as, precision_name
from lorasum.settings import EVAL_BATCH_SIZE, DataSettings, RuntimeSettings, field_problems
from lorasum.training.low_memory import HeadNll, SoftmaxNll, folded_lora, fused_head

# Architectures whose logits are exactly lm_head(last hidden state): for them the head is applied
# to counted positions only, which skips most of the vocabulary projection on prompts and padding.
# Anything else (logit soft-capping, scaling) goes through the model's own forward.
PLAIN_HEAD_TYPES = frozenset(
    {"llama", "mistral", "qwen2", "qwen3", "gpt2", "olmo", "olmo2", "phi3", "gpt_neox", "gemma"}
)


def unwrap(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a PeftModel (LoRA layers stay injected and active)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def counted_logits(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and targets at counted positions: ((N, V) float32, (N,) long), N = counted tokens."""
    hf = unwrap(model)
    targets = batch.input_ids[:, 1:]  # (B, T-1)
    mask = batch.counted[:, 1:]  # (B, T-1)
    if getattr(hf.config, "model_type", None) in PLAIN_HEAD_TYPES:
        hidden = hf.base_model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask
        ).last_hidden_state  # (B, T, H)
        logits = hf.get_output_embeddings()(hidden[:, :-1][mask])  # (N, V)
    else:
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        logits = out.logits[:, :-1][mask]  # (N, V)
    return logits.float(), targets[mask]


HEAD_CHUNK = 256  # counted positions per vocabulary projection when no gradient is needed


def _chunked_nll(hf: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """NLL at each counted position (N,), the vocabulary projection HEAD_CHUNK positions at a
    time: without autograd, N × V logits (and their log-softmax) never exist at once."""
    head = hf.get_output_embeddings()
    chunks = zip(hidden.split(HEAD_CHUNK), targets.split(HEAD_CHUNK), strict=True)
    if fused_head(head, hidden) and len(hidden):
        # One logits buffer for every chunk, the log-softmax in place: the same numbers without
        # two fresh ~50 MB tensors per chunk (each page-faulted in anew by the kernel)
        buf = hidden.new_empty(min(HEAD_CHUNK, len(hidden)), head.weight.shape[0])
        parts = []
        for h, t in chunks:
            logp = torch.mm(h, head.weight.t(), out=buf[: len(h)])  # (n, V)
            torch.log_softmax(logp, dim=-1, out=logp)  # rows are read before written
            parts.append(logp.gather(1, t.unsqueeze(1)).squeeze(1).neg_())
        return torch.cat(parts)
    parts = [F.cross_entropy(head(h).float(), t, reduction="none") for h, t in chunks]
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


def token_nll(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL and counted-token count per row: ((B,), (B,)).

    Without autograd (evaluation) and on a plain-head model the vocabulary projection runs in
    chunks of HEAD_CHUNK counted positions (same numbers: each position's NLL is its own);
    a batch of 16 × 128 otherwise holds two N × V float32 tensors (~0.6 GB with a 49k vocabulary).
    With autograd the loss is `lean.SoftmaxNll` (cross-entropy whose backward reuses the saved
    log-probabilities in place), with the projection folded in (`lean.HeadNll`) for a plain
    fp32 head outside autocast."""
    hf = unwrap(model)
    mask = batch.counted[:, 1:]  # (B, T-1)
    plain = getattr(hf.config, "model_type", None) in PLAIN_HEAD_TYPES
    if plain:
        hidden = hf.base_model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask
        ).last_hidden_state[:, :-1][mask]  # (N, H)
        targets = batch.input_ids[:, 1:][mask]  # (N,)
        head = hf.get_output_embeddings()
    if plain and not torch.is_grad_enabled():
        nll = _chunked_nll(hf, hidden, targets)  # (N,)
    elif plain and fused_head(head, hidden):  # fp32 training: one N × V tensor, not two
        nll = HeadNll.apply(hidden, head.weight, targets)
    elif plain:
        nll = SoftmaxNll.apply(head(hidden).float(), targets)  # as `counted_logits` gives them
    else:
        logits, targets = counted_logits(model, batch)
        nll = SoftmaxNll.apply(logits, targets)  # (N,): cross_entropy with a shorter backward
    rows = torch.arange(mask.shape[0], device=mask.device).unsqueeze(1).expand_as(mask)[mask]
    per_row = torch.zeros(mask.shape[0], device=nll.device).index_add_(0, rows, nll)
    return per_row, mask.sum(1)


@contextlib.contextmanager
def inference_context(model: nn.Module, amp_dtype: torch.dtype | None):
    """Evaluation mode with the speed-ups of every scoring pass (frozen linears and norm outputs
    held in ``amp_dtype``, LoRA folded in fp32); the training mode restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with (
            frozen_linears_as(model, amp_dtype),
            norm_outputs_as(unwrap(model), amp_dtype),
            folded_lora(model, enabled=amp_dtype is None),
        ):
            yield
    finally:
        model.train(was_training)


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def perplexity_from(nll: float, tokens: int) -> float:
    """exp(mean NLL); inf when that overflows a float (reported as inf, never a crash)."""
    if tokens <= 0:
        return float("nan")
    try:
        return math.exp(nll / tokens)
    except OverflowError:
        return float("inf")


@torch.inference_mode()
def evaluate_batches(
    model: nn.Module,
    batches: Sequence[Batch],
    names: Sequence[str],
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    progress: bool = False,
    desc: str = "eval",
) -> dict:
    """Perplexity over all batches and per source (token-weighted).

    In fp32 each LoRA module runs as one product with its folded weight W + s·B·A
    (`lorasum.training.low_memory.folded_lora`; same numbers to fp32 rounding)."""
    from tqdm.auto import tqdm

    nll = torch.zeros(len(names), dtype=torch.float64)
    tokens = torch.zeros(len(names), dtype=torch.long)
    real_tokens = positions = 0
    t0 = time.perf_counter()
    with inference_context(model, amp_dtype):
        for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
            real_tokens += int(batch.attention_mask.sum())
            positions += batch.input_ids.numel()
            batch = batch.to(device)
            with autocast_context(device, amp_dtype):
                row_nll, row_tokens = token_nll(model, batch)
            ds = batch.dataset.cpu()
            nll.index_add_(0, ds, row_nll.double().cpu())
            tokens.index_add_(0, ds, row_tokens.cpu())
    seconds = time.perf_counter() - t0
    total_nll, total_tokens = float(nll.sum()), int(tokens.sum())
    return {
        "timing": {"seconds": seconds, "real_tokens": real_tokens, "positions": positions},
        "precision": precision_name(amp_dtype),
        "perplexity": perplexity_from(total_nll, total_tokens),
        "nll": total_nll,
        "tokens": total_tokens,
        "per_dataset": {
            name: {
                "perplexity": perplexity_from(float(nll[i]), int(tokens[i])),
                "nll": float(nll[i]),
                "tokens": int(tokens[i]),
            }
            for i, name in enumerate(names)
        },
    }


@torch.inference_mode()
def row_nlls(
    model: nn.Module,
    items: Sequence[tuple[Tokenized, int]],
    batch_size: int,
    pad_id: int,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each item's summed NLL over its counted tokens, and their number, in the items' order:
    ((N,) float64, (N,) long). The batches `evaluate_batches` makes of the same items, so the
    same numbers row by row."""
    rows = [(t, i) for i, (t, _) in enumerate(items)]  # a row's own index rides as its dataset
    nll = torch.zeros(len(rows), dtype=torch.float64)
    tokens = torch.zeros(len(rows), dtype=torch.long)
    with inference_context(model, amp_dtype):
        for batch in make_batches(rows, batch_size, pad_id, shuffle=False):
            batch = batch.to(device)
            with autocast_context(device, amp_dtype):
                row_nll, row_tokens = token_nll(model, batch)
            index = batch.dataset.cpu()
            nll.index_add_(0, index, row_nll.double().cpu())
            tokens.index_add_(0, index, row_tokens.cpu())
    return nll, tokens


# Task accuracy (the math in `lorasum.accuracy`)


@torch.inference_mode()
def option_logliks(
    model: nn.Module,
    tokenizer,
    rows: Sequence[QA],
    max_length: int,
    batch_size: int,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
) -> list[list[float]]:
    """Each row's options' summed log-likelihoods (one list per row, in option order), every
    option of a question in the same forward pass."""
    items = [
        [tokenize_choice(tokenizer, qa.question, c, max_length) for c in qa.choices] for qa in rows
    ]
    sizes = [len(x) for x in items]
    lengths = [max(len(t.input_ids) for t in x) for x in items]
    out: list[list[float]] = [[] for _ in rows]
    with inference_context(model, amp_dtype):
        for group in question_groups(sizes, lengths, batch_size):
            batch = collate([(t, 0) for q in group for t in items[q]], tokenizer.pad_token_id)
            with autocast_context(device, amp_dtype):
                nll, _ = token_nll(model, batch.to(device))  # (B,)
            ll = (-nll.double().cpu()).tolist()
            for q in group:
                out[q], ll = ll[: sizes[q]], ll[sizes[q] :]
    return out


@torch.inference_mode()
def greedy_answers(
    model: nn.Module,
    tokenizer,
    questions: Sequence[str],
    max_new_tokens: int,
    max_length: int,
    batch_size: int,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
) -> list[str]:
    """Greedy generations after each question's prompt (left-padded batches), cut at EOS and
    to their first non-empty line (`first_line`)."""
    from transformers import GenerationConfig

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    keep = max(1, max_length - max_new_tokens)
    prompts = [cut_left(prompt_ids(tokenizer, q), keep, tokenizer.bos_token_id) for q in questions]
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=pad,
        eos_token_id=tokenizer.eos_token_id,
    )
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out = [""] * len(prompts)
    hf = unwrap(model)
    with inference_context(model, amp_dtype):
        for s in range(0, len(order), batch_size):
            group = order[s : s + batch_size]
            width = max(len(prompts[i]) for i in group)
            ids = torch.full((len(group), width), pad, dtype=torch.long)  # (B, T) left-padded
            mask = torch.zeros((len(group), width), dtype=torch.long)
            for r, i in enumerate(group):
                ids[r, width - len(prompts[i]) :] = torch.tensor(prompts[i])
                mask[r, width - len(prompts[i]) :] = 1
            with autocast_context(device, amp_dtype):
                new = hf.generate(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    generation_config=config,
                )[:, width:]  # (B, ≤ max_new_tokens)
            for r, i in enumerate(group):
                tokens = new[r].tolist()
                if tokenizer.eos_token_id in tokens:
                    tokens = tokens[: tokens.index(tokenizer.eos_token_id)]
                out[i] = first_line(tokenizer.decode(tokens, skip_special_tokens=True))
    return out


def accuracy_of(
    model: nn.Module,
    tokenizer,
    sources: Sequence,
    split: str,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    max_length: int = DataSettings.max_length,
    batch_size: int = EVAL_BATCH_SIZE,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
) -> dict:
    """acc / acc_norm over the rows with options, exact match over the short free-form rows,
    the skipped rows counted: overall (question-weighted) and per source."""
    total = Tally()
    per: dict[str, dict] = {}
    for src in sources:
        rows = src.splits[split]
        tally = Tally(skipped=sum(row_kind(qa) == "skip" for qa in rows))
        choice = [qa for qa in rows if row_kind(qa) == "choice"]
        if choice:
            scores = option_logliks(
                model, tokenizer, choice, max_length, batch_size, device, amp_dtype
            )
            for qa, ll in zip(choice, scores, strict=True):
                best, best_norm = pick(ll, [len(c) for c in qa.choices])
                tally.questions += 1
                tally.correct += best == qa.label
                tally.correct_norm += best_norm == qa.label
        match = [qa for qa in rows if row_kind(qa) == "match"]
        if match:
            predictions = greedy_answers(
                model,
                tokenizer,
                [qa.question for qa in match],
                max_new_tokens,
                max_length,
                batch_size,
                device,
                amp_dtype,
            )
            for qa, p in zip(match, predictions, strict=True):
                tally.generated += 1
                tally.matched += exact_match(p, qa.accepted or (qa.answer,))
        per[src.name] = tally.summary()
        total.add(tally)
    return {**total.summary(), "max_new_tokens": max_new_tokens, "per_dataset": per}


def _eval_data(
    data: Sequence[str] | str,
    split: str,
    batch_size: int,
    metric: str,
    max_new_tokens: int,
    settings: dict,
) -> list[str]:
    """`evaluate`'s data sources as a list (commas split), its other arguments checked (the
    shared ``settings`` by their own checks, `lorasum.settings`); every problem at once."""
    from lorasum.accuracy import METRICS

    if isinstance(data, str):
        data = [data]
    data = [d for item in data for d in item.split(",") if d]
    problems = [] if data else ["no data given; pass --data math (or a .jsonl/.csv/hf: source)"]
    if split not in ("train", "val", "test"):
        problems.append(f"--split {split!r}: use train, val or test")
    problems += field_problems(settings)
    if batch_size < 1:
        problems.append("--batch-size must be >= 1")
    if metric not in METRICS:
        problems.append(f"--metric {metric!r}: use one of {', '.join(METRICS)}")
    if max_new_tokens < 1:
        problems.append("--max-new-tokens must be >= 1")
    raise_all(problems, "invalid evaluation settings")
    return data


def evaluate(
    model: str = RuntimeSettings.model,
    data: Sequence[str] = (),
    adapter: str | None = None,
    split: str = "test",
    max_length: int = DataSettings.max_length,
    batch_size: int = EVAL_BATCH_SIZE,
    split_seed: int = DataSettings.split_seed,
    max_eval: int | None = DataSettings.max_eval,
    answer_only: bool = DataSettings.answer_only,
    question_field: str | None = DataSettings.question_field,
    answer_field: str | None = DataSettings.answer_field,
    precision: str = RuntimeSettings.precision,
    device: str = RuntimeSettings.device,
    progress: bool = True,
    metric: str = "perplexity",
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    choices_field: str | None = DataSettings.choices_field,
) -> dict:
    """`lorasum eval`: perplexity of a base model (optionally with an adapter) on data splits;
    with ``metric`` accuracy or all, task accuracy (`lorasum.accuracy`: acc / acc_norm over
    multiple-choice rows, exact match of greedy answers over short free-form rows) under
    ``"accuracy"``. The default (perplexity) result is exactly what it was before accuracy."""
    from lorasum.accuracy import check_scorable
    from lorasum.adapters import check_fits, read_adapter
    from lorasum.data.split import load_split
    from lorasum.data.tokenize import check_answers_fit, make_batches, tokenize_split
    from lorasum.models.loading import load_model, load_tokenizer
    from lorasum.models.precision import autocast_dtype, pick_device

    settings = {"max_length": max_length, "max_eval": max_eval, "precision": precision}
    data = _eval_data(data, split, batch_size, metric, max_new_tokens, settings)
    adapter_obj = read_adapter(adapter) if adapter else None  # validate before loading a model
    sources = [
        load_split(d, split_seed, question_field, answer_field, None, max_eval, choices_field)
        for d in data
    ]
    perplexity, accuracy = metric in ("perplexity", "all"), metric in ("accuracy", "all")
    if accuracy:
        check_scorable(sources, split)
    dev = pick_device(device)
    tokenizer = load_tokenizer(model)
    net = load_model(model, dev)
    if adapter_obj is not None:
        from peft import PeftModel

        check_fits(adapter_obj, net, model)
        net = PeftModel.from_pretrained(net, adapter)
    amp_dtype = autocast_dtype(precision, dev)
    result: dict = {}
    if perplexity:
        items = tokenize_split(tokenizer, sources, split, max_length, answer_only)
        check_answers_fit(items, sources, split, max_length)
        batches = make_batches(items, batch_size, tokenizer.pad_token_id, shuffle=False, lazy=True)
        result = evaluate_batches(
            net, batches, data, dev, amp_dtype, progress=progress, desc=f"eval {split}"
        )
    if accuracy:
        result["precision"] = precision_name(amp_dtype)
        result["accuracy"] = accuracy_of(
            net, tokenizer, sources, split, dev, amp_dtype, max_length, batch_size, max_new_tokens
        )
    return {
        **result,
        "model": model,
        "adapter": adapter,
        "split": split,
        "answer_only": answer_only,
        "max_length": max_length,
    }
