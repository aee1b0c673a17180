"""Orthogonality of LoRA adapters: per-module cosine of ΔW in factored form, RMS over modules."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path

from lorasum.adapters import Adapter, read_adapter
from lorasum.errors import LorasumError
from lorasum.factors import Factors, global_cosine, module_cosines, rms


def pair_similarity(a: Factors, b: Factors) -> dict:
    """Cosine per shared module, their RMS, and the whole-adapter cosine."""
    shapes = [n for n in a.keys() & b.keys() if a[n].shape != b[n].shape]
    if shapes:
        n = sorted(shapes)[0]
        raise LorasumError(
            f"module {n} has ΔW {a[n].shape} in one adapter and {b[n].shape} in the other; "
            "compare adapters of the same base model"
        )
    cos = module_cosines(a, b)
    if not cos:
        raise LorasumError("the adapters share no module; compare adapters of one base model")
    return {
        "rms_cosine": rms(list(cos.values())),
        "global_cosine": global_cosine(a, b),
        "modules": cos,
        "unshared_modules": sorted(a.keys() ^ b.keys()),
    }


def similarity_matrix(adapters: Mapping[str, Factors]) -> list[dict]:
    """Every unordered pair of named adapters."""
    return [
        {"a": na, "b": nb, **pair_similarity(adapters[na], adapters[nb])}
        for na, nb in itertools.combinations(adapters, 2)
    ]


def combination_rms(pairs: Sequence[dict], names: Sequence[str]) -> float:
    """RMS cosine of a combination: a pair's own RMS; for more, the RMS over its pairs' RMS."""
    wanted = {frozenset(p) for p in itertools.combinations(names, 2)}
    values = [p["rms_cosine"] for p in pairs if frozenset((p["a"], p["b"])) in wanted]
    if len(values) != len(wanted):
        raise ValueError(f"missing pairs for {names}")
    return rms(values)


def _unique_names(adapters: Sequence[Adapter]) -> list[str]:
    names = [a.name for a in adapters]
    if len(set(names)) != len(names):
        names = [str(a.path) for a in adapters]
    return names


def similarity(paths: Sequence[str | Path]) -> dict:
    """`lorasum similarity`: all pairwise similarities of adapters on disk."""
    if len(paths) < 2:
        raise LorasumError("similarity needs at least two adapters")
    adapters = [read_adapter(p) for p in paths]
    names = _unique_names(adapters)
    pairs = similarity_matrix({n: a.modules for n, a in zip(names, adapters, strict=True)})
    return {"adapters": [str(a.path) for a in adapters], "pairs": pairs}
