"""Tokenise each (source, split) once per process and reuse it across the study's units.

A study trains and evaluates many units on the same splits (a domain's rows appear in its
single adapter, in every merged-data adapter that contains it and in every evaluation on its
test split); tokenising is deterministic, so the result is cached by what determines it.
"""

from __future__ import annotations

from collections.abc import Sequence

from lorasum.data.sources import Source
from lorasum.data.tokenize import Tokenized, tokenize_split
from lorasum.settings import DataSettings

_CACHE: dict[tuple, list[Tokenized]] = {}
_MAX_ENTRIES = 256


def _key(tokenizer, source: Source, split: str, max_length: int, answer_only: bool) -> tuple:
    fp = source.fingerprint()[split]
    return (
        getattr(tokenizer, "name_or_path", ""),
        len(tokenizer),
        source.origin,
        fp["n"],
        fp["sha256"],
        split,
        max_length,
        answer_only,
    )


def tokenize_cached(
    tokenizer,
    sources: Sequence[Source],
    split: str,
    max_length: int,
    answer_only: bool = DataSettings.answer_only,
) -> list[tuple[Tokenized, int]]:
    """Like ``data.tokenize_split`` (same items, same order), from a per-process cache."""
    items: list[tuple[Tokenized, int]] = []
    for d, src in enumerate(sources):
        key = _key(tokenizer, src, split, max_length, answer_only)
        if key not in _CACHE:
            if len(_CACHE) >= _MAX_ENTRIES:
                _CACHE.pop(next(iter(_CACHE)))
            _CACHE[key] = (
                [t for t, _ in tokenize_split(tokenizer, [src], split, max_length, answer_only)]
                if src.splits[split]
                else []
            )
        items.extend((t, d) for t in _CACHE[key])
    if not items:
        tokenize_split(tokenizer, sources, split, max_length, answer_only)  # raises the usual error
    return items


def clear_cache() -> None:
    _CACHE.clear()
