"""Run a merge method over whole adapters, one module at a time, into one writable rank."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from lorasum.errors import LorasumError
from lorasum.factors import Factors, LoraFactors, pad_rank, single_threaded
from lorasum.methods.config import MergeConfig
from lorasum.methods.registry import MergeMethod, get_method


@dataclass
class MergeResult:
    """Merged adapter: every module at one rank (zero padded), scale 1, plus what it kept."""

    modules: dict[str, LoraFactors]
    rank: int  # the written rank (after --pad-rank-to)
    needed_rank: int  # the largest per-module rank of the result
    report: dict[str, dict]  # module -> {rank, kept_energy, relative_error, method details}


def resolve_weights(method: MergeMethod, weights: Sequence[float] | None, n: int) -> list[float]:
    """The per-adapter weights the method uses (mean: 1/N; weighted: given; else given or 1)."""
    if method.weights == "refused" and weights is not None:
        how = "sets every weight to 1/N" if method.name == "mean" else "sets its own weights"
        raise LorasumError(f"--method {method.name} {how}; drop --weights")
    if method.weights == "required" and weights is None:
        raise LorasumError(f"--method {method.name} needs --weights (one number per adapter)")
    if method.name == "mean":
        return [1.0 / n] * n
    return [1.0] * n if weights is None else [float(w) for w in weights]


def _merge_module(
    method: MergeMethod,
    adapters: Sequence[Factors],
    weights: Sequence[float],
    config: MergeConfig,
    name: str,
    grams: Sequence[Mapping[str, torch.Tensor]] | None = None,
) -> tuple[LoraFactors, dict]:
    terms = [a.get(name) for a in adapters]
    if method.calibration:
        module_grams = [g.get(name) for g in grams]
        if any(g is None for g in module_grams):
            i = next(i for i, g in enumerate(module_grams) if g is None)
            raise LorasumError(
                f"--method {method.name}: adapter {i + 1} has no calibration statistics for "
                f"module {name}; calibrate every adapter on the union of their modules"
            )
        result = method.merge(terms, weights, config, name, grams=module_grams)
    else:
        result = method.merge(terms, weights, config, name)
    f = result.factors
    if not (torch.isfinite(f.A).all() and torch.isfinite(f.B).all()):
        raise LorasumError(
            f"--method {method.name} gave NaN/inf for module {name} (checked before writing, "
            "nothing was written); use smaller --weights or check the merge options"
        )
    report = {
        "rank": f.rank,
        "kept_energy": result.kept_energy,
        "relative_error": result.relative_error,
        **result.details,
    }
    return f, report


def input_groups(
    names: Sequence[str], grams: Sequence[Mapping[str, torch.Tensor]]
) -> list[list[str]]:
    """Modules grouped by the Gram matrix objects they read (q/k/v of a layer share them, as
    `Calibration.normalised` gives them), in ``names`` order: a group's factorisations are
    computed once (`GramCache`), so a group is one task."""
    groups: dict[tuple[int, ...], list[str]] = {}
    for name in names:
        groups.setdefault(tuple(id(g.get(name)) for g in grams), []).append(name)
    return list(groups.values())


def _merge_groups_threaded(
    method: MergeMethod,
    adapters: Sequence[Factors],
    weights: Sequence[float],
    config: MergeConfig,
    names: Sequence[str],
    grams: Sequence[Mapping[str, torch.Tensor]],
    threads: int,
) -> dict[str, tuple[LoraFactors, dict]]:
    """`_merge_module` over every module, input groups spread over ``threads`` threads that
    each run torch on one thread (torch releases the GIL in its kernels). Every module is
    computed exactly as on one thread, whatever the scheduling: the results do not depend on
    ``threads``."""

    def run(group: list[str]) -> list[tuple[str, tuple[LoraFactors, dict]]]:
        return [
            (name, _merge_module(method, adapters, weights, config, name, grams)) for name in group
        ]

    with single_threaded(), ThreadPoolExecutor(threads) as pool:
        return dict(pair for part in pool.map(run, input_groups(names, grams)) for pair in part)


def file_rank(adapters: Sequence[Factors]) -> int:
    """The rank the written adapter has anyway: the largest Σ r_i over modules (the sum's rank
    of the module that most adapters adapt at the highest ranks)."""
    names = set().union(*(a.keys() for a in adapters))
    return max(sum(a[n].rank for a in adapters if n in a) for n in names)


def merge_adapters(
    adapters: Sequence[Factors],
    weights: Sequence[float],
    config: MergeConfig,
    grams: Sequence[Mapping[str, torch.Tensor]] | None = None,
) -> MergeResult:
    """Merge per module (missing module = zero ΔW) and bring every module to one rank.

    The dense methods (ties, dare_*, magnitude_prune) without ``--rank`` truncate every module
    at the file's rank (`file_rank`); each module's kept energy and relative error are in
    the report (the recipe's ``modules``).

    ``grams``: per adapter, module -> per-token input Gram matrix Ĝ (`lorasum.analysis.calibration`),
    needed by the methods registered with ``calibration=True`` (the others ignore it).
    Raises ``LorasumError`` (before anything is written) when ``--pad-rank-to`` is below the
    rank the result needs or when the result is not finite.
    """
    method = get_method(config.method)
    if method.calibration and grams is None:
        raise LorasumError(
            f"--method {method.name} needs input statistics of each adapter's domain; pass "
            "--calibration (or train the adapters with lorasum, which records their data)"
        )
    if grams is not None and len(grams) != len(adapters):
        raise ValueError(f"{len(grams)} Gram sets for {len(adapters)} adapters")
    names = sorted(set().union(*(a.keys() for a in adapters)))
    if method.dense and config.option("rank") is None:
        # Every module is padded to the file's rank anyway: truncate each dense result there
        # (its best approximation at no cost), not at the Σ r_i of the adapters that have it.
        config = config.replace(rank=file_rank(adapters))
    merged: dict[str, LoraFactors] = {}
    report: dict[str, dict] = {}
    threads = torch.get_num_threads()
    if method.calibration and threads > 1:
        # d_in×d_in factorisations per input: one LAPACK call per core on different modules
        # beats one threaded call (eigh barely scales and stalls next to a busy core)
        done = _merge_groups_threaded(method, adapters, weights, config, names, grams, threads)
        for name in names:
            merged[name], report[name] = done[name]
    else:
        with contextlib.ExitStack() as stack:
            if not method.dense:
                # small factored algebra: threads only add stalls (see factors.py)
                stack.enter_context(single_threaded())
            for name in names:
                merged[name], report[name] = _merge_module(
                    method, adapters, weights, config, name, grams
                )
    needed = max(1, max(f.rank for f in merged.values()))
    rank = needed
    pad_rank_to = config.option("pad_rank_to")
    if pad_rank_to is not None:
        if pad_rank_to < needed:
            raise LorasumError(
                f"--pad-rank-to {pad_rank_to} is below the rank this merge needs "
                f"({needed}); pass at least {needed}, or compress with --method svd --rank"
            )
        rank = pad_rank_to
    modules = {name: pad_rank(f, rank) for name, f in merged.items()}
    return MergeResult(modules=modules, rank=rank, needed_rank=needed, report=report)
