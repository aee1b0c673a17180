"""QA rows as answer-masked token batches.

Text format: ``Question: {q}\\nAnswer: {a}<eos>``. By default only answer tokens (and the EOS)
are counted in the loss and the perplexity; padding never is.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from lorasum.data.sources import QA, Source
from lorasum.errors import LorasumError
from lorasum.settings import DataSettings


def prompt_text(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def answer_text(answer: str) -> str:
    return f" {answer}"


@dataclass(frozen=True)
class Tokenized:
    input_ids: list[int]
    counted: list[bool]  # counted[t]: token t is a prediction target (never t = 0)
    truncated: bool = False  # the answer (with its EOS) was cut at max_length


def tokenize_qa(
    tokenizer, qa: QA, max_length: int, answer_only: bool = DataSettings.answer_only
) -> Tokenized:
    """Tokenise prompt and answer separately so the answer boundary is exact.

    Too long: the prompt is cut from the left (a leading BOS is kept) and the answer from the
    right, the answer keeping at least half of ``max_length`` (or all of itself).
    """
    prompt = tokenizer(prompt_text(qa.question), add_special_tokens=True)["input_ids"]
    answer = tokenizer(answer_text(qa.answer), add_special_tokens=False)["input_ids"]
    answer = [*answer, tokenizer.eos_token_id]
    full_answer = len(answer)
    if len(prompt) + len(answer) > max_length:
        bos = tokenizer.bos_token_id
        head = prompt[:1] if bos is not None and prompt[:1] == [bos] else []
        body = prompt[len(head) :]
        keep_answer = min(len(answer), max(max_length // 2, max_length - len(prompt)))
        keep_body = max(0, max_length - keep_answer - len(head))
        prompt = head + (body[len(body) - keep_body :] if keep_body > 0 else [])
        answer = answer[: max_length - len(prompt)]
    ids = prompt + answer
    counted = [False] * len(prompt) + [True] * len(answer) if answer_only else [True] * len(ids)
    counted[0] = False  # the first token is never predicted
    return Tokenized(ids, counted, truncated=len(answer) < full_answer)


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    counted: torch.Tensor  # (B, T) bool: targets; False on padding and prompts
    dataset: torch.Tensor  # (B,) index of the source each row came from

    def to(self, device: torch.device) -> Batch:
        return Batch(
            *(
                t.to(device)
                for t in (self.input_ids, self.attention_mask, self.counted, self.dataset)
            )
        )


def collate(items: Sequence[tuple[Tokenized, int]], pad_id: int) -> Batch:
    T = max(len(t.input_ids) for t, _ in items)
    B = len(items)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    counted = torch.zeros((B, T), dtype=torch.bool)
    for i, (t, _) in enumerate(items):
        n = len(t.input_ids)
        ids[i, :n] = torch.tensor(t.input_ids)
        mask[i, :n] = 1
        counted[i, :n] = torch.tensor(t.counted)
    dataset = torch.tensor([d for _, d in items], dtype=torch.long)
    return Batch(ids, mask, counted, dataset)


class LazyBatches(Sequence):
    """Batches collated only when read: one batch's tensors in memory at a time, not all
    (evaluation over 100,000 examples streams; see benchmarks/load.py)."""

    def __init__(self, items: Sequence[tuple[Tokenized, int]], groups: list[list[int]], pad_id):
        self.items, self.groups, self.pad_id = items, groups, pad_id

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return collate([self.items[j] for j in self.groups[i]], self.pad_id)

    def __iter__(self) -> Iterator[Batch]:
        return (self[i] for i in range(len(self)))


def make_batches(
    items: Sequence[tuple[Tokenized, int]],
    batch_size: int,
    pad_id: int,
    shuffle: bool,
    seed: int = 0,
    lazy: bool = False,
) -> list[Batch] | LazyBatches:
    """Batches with little padding: sorted by length (eval) or length-grouped in shuffled
    windows of 16 batches (train), then the batch order shuffled. ``lazy``: the same batches,
    collated one at a time as they are read."""
    order = list(range(len(items)))
    if shuffle:
        rng = random.Random(seed)
        rng.shuffle(order)
        window = batch_size * 16
        order = [
            i
            for s in range(0, len(order), window)
            for i in sorted(order[s : s + window], key=lambda j: len(items[j][0].input_ids))
        ]
    else:
        order.sort(key=lambda j: len(items[j][0].input_ids))
    groups = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    if shuffle:
        random.Random(seed + 1).shuffle(groups)  # the same permutation as shuffling batches
    if lazy:
        return LazyBatches(items, groups, pad_id)
    return [collate([items[i] for i in g], pad_id) for g in groups]


def tokenize_split(
    tokenizer,
    sources: Sequence[Source],
    split: str,
    max_length: int,
    answer_only: bool = DataSettings.answer_only,
) -> list[tuple[Tokenized, int]]:
    """Tokenise one split of several sources; each item remembers its source index."""
    items = [
        (tokenize_qa(tokenizer, qa, max_length, answer_only), d)
        for d, src in enumerate(sources)
        for qa in src.splits[split]
    ]
    if not items:
        names = ", ".join(s.name for s in sources)
        raise LorasumError(f"the {split} split of {names} is empty; use more data")
    return items


def check_answers_fit(
    items: Sequence[tuple[Tokenized, int]], sources: Sequence[Source], split: str, max_length: int
) -> None:
    """Refuse a source none of whose answers fits whole in ``max_length`` tokens: training or
    scoring it would only ever see answer prefixes (a --max-length set far too low)."""
    whole = [False] * len(sources)
    for t, d in items:
        whole[d] = whole[d] or not t.truncated
    for d, src in enumerate(sources):
        if not whole[d] and any(i == d for _, i in items):
            raise LorasumError(
                f"every answer in the {split} split of {src.name} is cut at --max-length "
                f"{max_length} tokens (none would be learned or scored whole); raise --max-length"
            )
