"""From a source's spec to its seeded train/val/test split: `load_source` picks the reader
(builtin domain, file or hub), `split_rows` splits the rows 80/10/10 by seed, `load_split` does
both (optionally keeping only the first rows of each split).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

from lorasum.data.builtin import BUILTIN_DOMAINS, load_builtin
from lorasum.data.sources import QA, Source, load_file, load_hf
from lorasum.errors import LorasumError
from lorasum.settings import DataSettings

SPLITS = ("train", "val", "test")
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)


def load_source(
    spec: str,
    question_field: str | None = None,
    answer_field: str | None = None,
    choices_field: str | None = None,
) -> tuple[list[QA], str]:
    """Load one source as a list of QA pairs and a description of where it came from."""
    if spec in BUILTIN_DOMAINS:
        rows, origin = load_builtin(spec)
    elif spec.startswith("hf:"):
        rows, origin = load_hf(spec, question_field, answer_field, choices_field)
    elif spec.lower().endswith((".jsonl", ".csv")) or Path(spec).exists():
        rows, origin = load_file(Path(spec), question_field, answer_field, choices_field)
    else:
        known = ", ".join(BUILTIN_DOMAINS)
        raise LorasumError(
            f"unknown data source {spec!r}; use a builtin domain ({known}), "
            "a .jsonl/.csv file or hf:<dataset id>[:split]"
        )
    if not rows:
        raise LorasumError(
            f"data source {spec} has no usable rows; every row needs a non-empty question "
            "and answer (check the file, or pick fields with --question-field/--answer-field)"
        )
    return rows, origin


def split_rows(rows: Sequence[QA], seed: int) -> dict[str, list[QA]]:
    """Deterministic seeded 80/10/10 train/val/test split (val/test get ≥1 row when possible)."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n = len(rows)
    n_test = max(1, round(n * SPLIT_FRACTIONS[2])) if n >= 3 else 0
    n_val = max(1, round(n * SPLIT_FRACTIONS[1])) if n >= 3 else 0
    n_train = n - n_val - n_test
    idx = {
        "train": order[:n_train],
        "val": order[n_train : n_train + n_val],
        "test": order[n_train + n_val :],
    }
    return {k: [rows[i] for i in v] for k, v in idx.items()}


def load_split(
    spec: str,
    seed: int,
    question_field: str | None = None,
    answer_field: str | None = None,
    max_train: int | None = None,
    max_eval: int | None = None,
    choices_field: str | None = None,
) -> Source:
    """Load and split one source; optionally keep only the first rows of each (shuffled) split."""
    rows, origin = load_source(spec, question_field, answer_field, choices_field)
    splits = split_rows(rows, seed)
    if max_train is not None:
        splits["train"] = splits["train"][:max_train]
    if max_eval is not None:
        splits["val"] = splits["val"][:max_eval]
        splits["test"] = splits["test"][:max_eval]
    return Source(name=spec, origin=origin, splits=splits)


def load_configured_split(spec: str, cfg: DataSettings) -> Source:
    """`load_split` of ``spec`` with the data settings of ``cfg`` (a `TrainConfig` or
    `DataSettings`): its split seed, fields and row caps."""
    return load_split(
        spec,
        cfg.split_seed,
        cfg.question_field,
        cfg.answer_field,
        cfg.max_train,
        cfg.max_eval,
        cfg.choices_field,
    )
