"""A study's unit of work as a type: `Task`, what every kind of unit answers.

A task is a frozen description of one cached piece of a study: its inputs are its fields (the
tasks it reads are fields too, and `dependencies` returns them), `key` is its cache key,
`cached` its finished result (or None), `run` does the work on a loaded model. Tasks are pure
functions of their key and their inputs' paths: any executor, on any worker or node, may run
one, and run it again if a worker died. Executors know nothing of what a task means; they ask
it for `dependencies`, `cost`, `resources`, `cached` and `run`.

Two tasks are the same unit when their ids are equal (``kind/seed/name``), so a task is a
dictionary key for its result.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

# Evaluation batches are length-sorted, so a larger batch adds little padding.
EVAL_BATCH_SIZE = 32
# The kinds of unit, in the order `reproduce --plan` lists them; the measured rates
# ($LORASUM_HOME/rates.json) are per kind.
KINDS = ("train", "eval", "calibrate", "gradients", "compose", "fit", "predictors")
COMPOSE_COST_ROWS = 8  # a composition takes a few seconds: like evaluating ~8 rows


@dataclass(frozen=True)
class Resources:
    """What one run of a task needs: CPU threads (0 = the worker's share), GPUs, memory."""

    threads: int = 0
    gpus: int = 0
    memory_gb: float = 2.0


def job_cost(kind: str, rows: int, max_length: int) -> float:
    """Relative cost of a task: ~3 passes per training row (forward, backward), one per
    evaluated row; ~token-proportional (≈ tokens / 1000)."""
    return rows * max_length * (3.0 if kind == "train" else 1.0) / 1000.0


def task_type(cls):
    """Make ``cls`` a task type: a frozen dataclass with keyword fields, compared and hashed by
    its id, shown by its id."""
    return dataclass(frozen=True, eq=False, kw_only=True, repr=False)(cls)


@task_type
class Task(ABC):
    """One cached piece of a study. Subclasses declare ``kind`` (one of `KINDS`) and their
    inputs as fields."""

    kind: ClassVar[str]
    seed: (
        int | None
    )  # None: seed-independent (the base model's evaluation, the data's gradients and predictors)

    @property
    @abstractmethod
    def name(self) -> str:
        """Unique among the tasks of its kind and seed (`study.names` builds it)."""

    @cached_property
    def id(self) -> str:
        """Unique in a plan: kind, seed and name."""
        return f"{self.kind}/{self.seed}/{self.name}"

    @property
    def label(self) -> str:
        """For the progress bar and error messages."""
        return f"{self.kind} {self.name} seed {self.seed}"

    def dependencies(self) -> tuple[Task, ...]:
        """The tasks whose outputs this one reads."""
        return ()

    def resources(self) -> Resources:
        return Resources()

    @abstractmethod
    def cost(self) -> float:
        """Relative work (`job_cost`), for the ETA and longest-first order."""

    def output(self) -> Path | None:
        """What it writes in the study directory (None: nothing of its own, e.g. a cache in
        $LORASUM_HOME); the ledger records and verifies it."""
        return None

    @abstractmethod
    def key(self) -> str:
        """Its cache key. Where the key hashes its inputs' contents it reads them, so call it
        once the dependencies are finished (before, it raises: OSError, or LorasumError where
        it reads an adapter directory)."""

    @abstractmethod
    def cached(self) -> Any | None:
        """The finished task's result, or None: run it. Asked once its dependencies are
        finished."""

    @abstractmethod
    def run(self, *, model, tokenizer) -> Any:
        """Do the work on the loaded base model (left unchanged); write the output atomically
        with its key; return a small JSON-able result."""

    def __hash__(self) -> int:
        return hash(self.id)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Task) and other.id == self.id

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.id})"


@task_type
class AdapterTask(Task):
    """A task whose output is an adapter directory (a training, a composition, a fit), which
    evaluations and routes read."""

    @abstractmethod
    def output(self) -> Path: ...

    def evaluation_name(self) -> str:
        """The name of its evaluation (and of its accuracy twin's, prefixed)."""
        return self.name
