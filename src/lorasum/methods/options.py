"""Merge-method options: each method declares the options it reads (`MergeMethod.options`).

An `Option` is one setting of a merge: its name (``--task-rank`` for ``task_rank``), the type
its flag parses to, its default, its help and its check. An option that several methods read
with the same meaning (rank, keep, density, majority_sign, seed, method_scale) is defined here
once and referenced by each of them, so that one flag means one thing; an option only one
method (or one module's methods) reads is defined in that method's module. The registry
refuses two different options under one name. The `compose` flags, `MergeConfig`'s checks and
the study's per-method options all read these declarations.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, eq=False)  # compared by identity: one declaration per name
class Option:
    """One option of a merge method.

    ``type``: what the ``--flag`` parses its text to (str, int, float). ``convert``: turns a
    given value into the stored one, raising ValueError(problem) (e.g. rank "8" → 8).
    ``check``: the problem with a (converted) value, or None. ``only_with``: the option only
    means something when this holds of the given values (else it is refused, and `resolved`
    leaves it out); ``only_with_text`` says when, for the message. ``required_hint``: how to
    give it, for the message of a method that requires it.
    """

    name: str
    type: Callable[[str], Any]
    default: Any
    help: str
    check: Callable[[Any], str | None] | None = None
    convert: Callable[[Any], Any] | None = None
    only_with: Callable[[Mapping[str, Any]], bool] | None = None
    only_with_text: str = ""
    required_hint: str | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def problem(self, value: Any) -> tuple[Any, str | None]:
        """(the stored value, the problem with it as one message or None)."""
        if self.convert is not None:
            try:
                value = self.convert(value)
            except ValueError as e:
                return value, f"{self.flag} {value!r}: {e}"
        problem = self.check(value) if self.check is not None else None
        if problem is None:
            return value, None
        shown = repr(value) if isinstance(value, str) else str(value)
        return value, f"{self.flag} {shown}: {problem}"


# --- checks: each returns the problem with a value, or None -----------------------------------


def in_unit_interval(value) -> str | None:
    """(0, 1]."""
    return None if 0.0 < value <= 1.0 else "must be in (0, 1]"


def in_closed_unit_interval(value) -> str | None:
    """[0, 1]."""
    return None if 0.0 <= value <= 1.0 else "must be in [0, 1]"


def at_least(low: int) -> Callable[[Any], str | None]:
    """≥ ``low``."""
    return lambda value: None if value >= low else f"must be ≥ {low}"


def finite(value) -> str | None:
    """A finite number."""
    return None if math.isfinite(value) else "must be a finite number"


def positive(value) -> str | None:
    """A finite number > 0."""
    return None if math.isfinite(value) and value > 0 else "must be > 0"


def one_of(*choices: str) -> Callable[[Any], str | None]:
    """One of ``choices``."""
    return lambda value: None if value in choices else f"choose {' or '.join(choices)}"


def _rank(value):
    """An integer rank (a digit string becomes an int) or 'auto'."""
    if isinstance(value, str) and value != "auto":
        try:
            return int(value)
        except ValueError:
            raise ValueError("expected an integer or 'auto'") from None
    return value


def _rank_check(value) -> str | None:
    if isinstance(value, bool) or (isinstance(value, int) and value < 1):
        return "must be ≥ 1 or 'auto'"
    return None


# --- the options several methods share ------------------------------------------------------

MAJORITY_SIGN_CHOICES = ("total", "frequency")

RANK = Option(
    "rank",
    str,  # the flag's text: converted to an int, or 'auto'
    None,
    "rank of the result: K, or 'auto' (per module the smallest rank keeping --keep of the energy)",
    check=_rank_check,
    convert=_rank,
    required_hint="--rank K (an integer) or --rank auto",
)
KEEP = Option(
    "keep",
    float,
    0.99,
    "with --rank auto: fraction of the Frobenius energy kept",
    check=in_unit_interval,
    only_with=lambda given: given.get("rank") == "auto",
    only_with_text="--rank auto",
)
DENSITY = Option(
    "density",
    float,
    None,
    "fraction of each ΔW's entries kept, (0, 1]",
    check=in_unit_interval,
    required_hint="--density (the fraction of ΔW entries kept, e.g. 0.2)",
)
MAJORITY_SIGN = Option(
    "majority_sign",
    str,
    "total",
    "sign election by 'total' or 'frequency'",
    check=one_of(*MAJORITY_SIGN_CHOICES),
)
SEED = Option("seed", int, 0, "seed of the method's random choices", check=at_least(0))
METHOD_SCALE = Option("method_scale", float, 1.0, "overall scaling coefficient α", check=finite)
#: Every method reads it: the engine pads the written adapter (not in any method's `options`).
PAD_RANK_TO = Option(
    "pad_rank_to",
    int,
    None,
    "pad the written adapter with zeros to this rank (a serving rank)",
    check=at_least(1),
)
COMMON_OPTIONS: tuple[Option, ...] = (PAD_RANK_TO,)
