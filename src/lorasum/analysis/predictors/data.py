"""Data/gradient-space predictors: interference predicted before any training, from the base
model and each domain's training rows (`lorasum.analysis.gradients`; needs base model + data).

- ``grad_cosine_rms``: RMS over the combination's pairs of each pair's RMS over modules of the
  cosine between the domains' mean gradients (for a pair: the pair's value; the same
  aggregation as the adapters' ``rms_cosine``);
- ``grad_cosine_mean``: mean over pairs of the mean over modules (keeps the sign: domains whose
  gradients conflict are negative);
- ``grad_cosine_global``: mean over pairs of the cosine of the concatenated gradients;
- ``base_loss_mean`` and ``base_loss_spread``: mean and max − min over the combination's domains
  of the base model's answer-token loss (mean NLL) on their training rows.

`lorasum predict --domains` (`lorasum.analysis.predict.predict_domains`) computes them for
named domains; `DATA` is the registered family. A study computes each domain's statistics in a
unit of its own and its data-predictors unit (one per study: seed independent) combines them:
given ``PredictorInputs.gradients``, `compute_data` only compares the saved statistics
(`from_gradients`), with the same numbers as computing them here.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path

from lorasum.analysis.gradients import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_MAX_BYTES,
    DomainGradients,
    domain_gradients,
    gradient_cosines,
    target_module_names,
)
from lorasum.analysis.predictors.registry import Predictor, PredictorFamily, PredictorInputs
from lorasum.data.sources import combo_name
from lorasum.errors import LorasumError
from lorasum.factors import rms
from lorasum.settings import LoraSettings


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def combination_values(cosines: dict, combo: Sequence[str]) -> dict[str, float]:
    """The adapter-free predictors of one combination from `gradients.gradient_cosines`."""
    index = {n: i for i, n in enumerate(cosines["names"])}
    missing = [d for d in combo if d not in index]
    if missing:
        raise LorasumError(f"no gradient statistics for domain(s) {', '.join(missing)}")
    pairs = list(itertools.combinations([index[d] for d in combo], 2))
    losses = [cosines["loss"][d] for d in combo]
    return {
        "grad_cosine_rms": rms([cosines["rms"][i][j] for i, j in pairs]),
        "grad_cosine_mean": _mean([cosines["mean"][i][j] for i, j in pairs]),
        "grad_cosine_global": _mean([cosines["global"][i][j] for i, j in pairs]),
        "base_loss_mean": _mean(losses),
        "base_loss_spread": max(losses) - min(losses),
    }


def gradient_statistics(
    model,
    tokenizer,
    sources: Mapping[str, object],
    max_length: int,
    target_modules: str | Sequence[str] = LoraSettings.target_modules,
    *,
    model_spec: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_bytes: int = DEFAULT_MAX_BYTES,
    cache_dir: str | Path | None = None,
    cache: bool = True,
) -> dict:
    """`gradients.gradient_cosines` of the named domains (``sources``: name -> Source, their
    train splits), each domain's gradients computed once and cached (see `lorasum.analysis.gradients`)."""
    spec = model_spec or getattr(getattr(model, "config", None), "_name_or_path", None)
    if not spec:
        raise LorasumError("the model has no name for the gradient cache; pass model_spec")
    shapes = target_module_names(model, target_modules)
    grads = {
        name: domain_gradients(
            model,
            tokenizer,
            source,
            max_length,
            shapes,
            model_spec=str(spec),
            batch_size=batch_size,
            max_bytes=max_bytes,
            cache_dir=cache_dir,
            cache=cache,
        )
        for name, source in sources.items()
    }
    out = gradient_cosines(grads)
    out["computed"] = {n: g.computed for n, g in grads.items()}
    return out


def used_domains(combos: Sequence[Sequence[str]]) -> list[str]:
    """The domains of ``combos``, each once, in their order of first appearance."""
    return list(dict.fromkeys(d for c in combos for d in c))


def combinations_of(stats: dict, combos) -> dict[str, dict[str, float]]:
    """combination name -> `combination_values` of the pairwise statistics ``stats``."""
    return {combo_name(c): combination_values(stats, c) for c in combos}


def from_gradients(
    grads: Mapping[str, DomainGradients], combos: Sequence[Sequence[str]]
) -> dict[str, dict[str, float]]:
    """The `DATA` family's values from each domain's statistics already computed (a study's
    per-domain units): the same comparison, over the same domains in the same order, as
    `data_predictors` makes after computing them."""
    used = used_domains(combos)
    missing = [d for d in used if d not in grads]
    if missing:
        raise LorasumError(f"no gradient statistics for domain(s) {', '.join(missing)}")
    return combinations_of(gradient_cosines({d: grads[d] for d in used}), combos)


def data_predictors(
    model,
    tokenizer,
    sources: Mapping[str, object],
    combos: Sequence[Sequence[str]],
    max_length: int,
    target_modules: str | Sequence[str] = LoraSettings.target_modules,
    **options,
) -> dict[str, dict[str, float]]:
    """combination name ("a+b") -> {predictor: value} of the `DATA` family, computed from the
    base ``model`` (run as it is; fp32 recommended) and the domains' train splits.

    ``sources``: name -> `lorasum.data.Source` (every domain of ``combos``); ``options``: those
    of `gradient_statistics` (model_spec, batch_size, max_bytes, cache_dir, cache). Seed
    independent: the same for every training seed of a study.
    """
    used = used_domains(combos)
    missing = [d for d in used if d not in sources]
    if missing:
        raise LorasumError(f"no data source for domain(s) {', '.join(missing)}")
    stats = gradient_statistics(
        model, tokenizer, {d: sources[d] for d in used}, max_length, target_modules, **options
    )
    return combinations_of(stats, combos)


def compute_data(inputs: PredictorInputs, combos) -> dict[str, dict[str, float | None]]:
    """`from_gradients` of ``inputs.gradients`` where given, else `data_predictors` of
    ``inputs`` (base model, tokenizer, sources, max length, model spec)."""
    if inputs.gradients is not None:
        return from_gradients(inputs.gradients, combos)
    return data_predictors(
        inputs.model,
        inputs.tokenizer,
        inputs.sources,
        combos,
        inputs.max_length,
        model_spec=inputs.model_spec,
    )


DATA = PredictorFamily(
    name="data",
    predictors=(
        Predictor("grad_cosine_rms", "RMS cosine of the domains' mean gradients at the base model"),
        Predictor(
            "grad_cosine_mean", "mean cosine of the domains' mean gradients at the base model"
        ),
        Predictor(
            "grad_cosine_global", "cosine of the domains' whole mean gradients at the base model"
        ),
        Predictor("base_loss_mean", "mean base-model loss of the domains"),
        Predictor("base_loss_spread", "spread (max − min) of the domains' base-model loss"),
    ),
    needs=frozenset({"base_model_data"}),
    compute=compute_data,
    summary="before training: cosines of the domains' mean gradients at the base model, and "
    "the base model's loss on each domain",
)
