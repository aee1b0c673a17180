"""Interference predictors that need no adapter, per combination of domains, and
`lorasum predict --domains`.

From the base model and each domain's training rows (`lorasum.analysis.gradients`):

- ``grad_cosine_rms``: RMS over the combination's pairs of each pair's RMS over modules of the
  cosine between the domains' mean gradients (for a pair: the pair's value; the same
  aggregation as the adapters' ``rms_cosine``);
- ``grad_cosine_mean``: mean over pairs of the mean over modules (keeps the sign: domains whose
  gradients conflict are negative);
- ``grad_cosine_global``: mean over pairs of the cosine of the concatenated gradients;
- ``base_loss_mean`` and ``base_loss_spread``: mean and max − min over the combination's domains
  of the base model's answer-token loss (mean NLL) on their training rows.

Once single adapters exist, from the study's cross-domain matrix (every single adapter on every
domain's test split, `lorasum.study.results.cross_domain`):

- ``transfer``: mean over ordered pairs i ≠ j in the combination of the change of domain i's
  perplexity under adapter j relative to the base model, in % (negative: j helps i);
- ``transfer_share``: mean over ordered pairs of log(ppl_base,i / ppl_j,i) /
  log(ppl_base,i / ppl_i,i), the share of domain i's own adapter's gain that adapter j gets
  (1: as much as i's own; pairs whose own adapter does not lower the perplexity are skipped).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from lorasum.analysis.forecast import DATA_PREDICTORS
from lorasum.analysis.gradients import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_MAX_BYTES,
    domain_gradients,
    gradient_cosines,
    target_module_names,
)
from lorasum.errors import LorasumError
from lorasum.factors import rms


def combo_name(combo: Sequence[str]) -> str:
    return "+".join(combo)


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
    target_modules: str | Sequence[str] = "auto",
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


def data_predictors(
    model,
    tokenizer,
    sources: Mapping[str, object],
    combos: Sequence[Sequence[str]],
    max_length: int,
    target_modules: str | Sequence[str] = "auto",
    **options,
) -> dict[str, dict[str, float]]:
    """combination name ("a+b") -> {predictor: value} for `DATA_PREDICTORS`, computed from the
    base ``model`` (run as it is; fp32 recommended) and the domains' train splits.

    ``sources``: name -> `lorasum.data.Source` (every domain of ``combos``); ``options``: those
    of `gradient_statistics` (model_spec, batch_size, max_bytes, cache_dir, cache). Seed
    independent: the same for every training seed of a study.
    """
    used = list(dict.fromkeys(d for c in combos for d in c))
    missing = [d for d in used if d not in sources]
    if missing:
        raise LorasumError(f"no data source for domain(s) {', '.join(missing)}")
    stats = gradient_statistics(
        model, tokenizer, {d: sources[d] for d in used}, max_length, target_modules, **options
    )
    return {combo_name(c): combination_values(stats, c) for c in combos}


def transfer_predictor(
    cross_domain: Mapping, combos: Sequence[Sequence[str]]
) -> dict[str, dict[str, float | None]]:
    """combination name -> {"transfer", "transfer_share"} from a cross-domain perplexity matrix.

    ``cross_domain``: `study.results.cross_domain`'s dict, or its ``perplexity`` table itself:
    adapter name (and "base") -> {domain: perplexity}.
    """
    table = cross_domain.get("perplexity", cross_domain)
    if "base" not in table:
        raise LorasumError("the cross-domain matrix has no 'base' row (the base model's ppl)")
    out = {}
    for combo in combos:
        changes, shares = [], []
        for i, j in itertools.permutations(combo, 2):
            try:
                base, own, other = table["base"][i], table[i][i], table[j][i]
            except KeyError:
                raise LorasumError(
                    f"the cross-domain matrix lacks adapter {j} or {i} on domain {i}; evaluate "
                    "every single adapter on every domain (--cross-domain)"
                ) from None
            changes.append((other / base - 1.0) * 100.0)
            if own < base:
                shares.append(math.log(base / other) / math.log(base / own))
        out[combo_name(combo)] = {"transfer": _mean(changes), "transfer_share": _mean(shares)}
    return out


# --- `lorasum predict --domains`: before any training ---------------------------------------


def _check_settings(predictor: str, max_length: int, max_train: int | None, max_order) -> None:
    problems = []
    known = ("auto", *DATA_PREDICTORS)
    if predictor not in known:
        problems.append(f"unknown predictor {predictor!r} (choose one of: {', '.join(known)})")
    if max_length < 8:
        problems.append(f"--max-length {max_length} must be >= 8")
    if max_train is not None and max_train < 1:
        problems.append(f"--max-train {max_train} must be >= 1")
    if max_order is not None and max_order < 2:
        problems.append(f"--max-order {max_order}: combinations have at least 2 domains")
    if problems:
        raise LorasumError("; ".join(problems))


def _ranking(studies: list[dict]) -> dict:
    from lorasum.analysis import forecast

    names = [n for n in DATA_PREDICTORS if n in forecast.available_predictors(studies)]
    if not names:
        raise LorasumError(
            "the --fit studies carry no adapter-free predictors "
            f"({', '.join(DATA_PREDICTORS[:2])}, …); rerun them with a lorasum that records them"
        )
    return forecast.rank_predictors(studies, names)


def predict_domains(
    domains: Mapping[str, str],
    *,
    model: str = "default",
    fit: Sequence[str | Path] | None = None,
    predictor: str = "auto",
    max_length: int = 128,
    max_train: int | None = 64,
    split_seed: int = 42,
    target_modules: str | Sequence[str] = "auto",
    max_order: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_bytes: int = DEFAULT_MAX_BYTES,
    device: str = "auto",
) -> dict:
    """`lorasum predict --domains`: the adapter-free predictors of every combination of 2 …
    ``max_order`` of the named domains (name -> source), before any training; with ``fit``
    (finished study directories whose rows carry these predictors) the Δ% forecast of each
    combination from ``predictor`` ('auto': the best leave-one-combination-out Spearman). The
    studies are read before the model runs. The values depend on the rows (``max_train``,
    ``split_seed``) and ``max_length``: match the studies' settings when forecasting."""
    from lorasum.analysis import forecast
    from lorasum.data import load_split
    from lorasum.models import load_model, load_tokenizer, pick_device

    _check_settings(predictor, max_length, max_train, max_order)
    studies = forecast.read_studies(fit) if fit else []
    ranking = _ranking(studies) if studies else {}
    sources = {}
    for name, spec in domains.items():
        sources[name] = load_split(spec, split_seed, max_train=max_train)
        sources[name].name = name
    tokenizer = load_tokenizer(model)
    net = load_model(model, pick_device(device))
    stats = gradient_statistics(
        net,
        tokenizer,
        sources,
        max_length,
        target_modules,
        model_spec=model,
        batch_size=batch_size,
        max_bytes=max_bytes,
    )
    names = list(domains)
    top = len(names) if max_order is None else min(max_order, len(names))
    combos = [c for k in range(2, top + 1) for c in itertools.combinations(names, k)]
    values = {combo_name(c): combination_values(stats, c) for c in combos}
    chosen = predictor
    if predictor == "auto":
        chosen = (forecast.best_predictor(ranking) if ranking else None) or "grad_cosine_rms"
    forecasts = (
        {c: forecast.forecast(studies, chosen, v[chosen]) for c, v in values.items()}
        if studies
        else None
    )
    return {
        "domains": dict(domains),
        "model": model,
        "max_length": max_length,
        "max_train": max_train,
        "rows": {n: len(s.splits["train"]) for n, s in sources.items()},
        "modules": len(stats["modules"]),
        "base_loss": stats["loss"],
        "pairs": [
            {
                "a": a,
                "b": b,
                **{k: stats[k][i][j] for k in ("rms", "mean", "global")},
            }
            for (i, a), (j, b) in itertools.combinations(enumerate(names), 2)
        ],
        "predictors": values,
        "predictor": chosen,
        "auto": predictor == "auto",
        "ranking": ranking,
        "forecast": forecasts,
    }


def format_domain_prediction(out: dict) -> str:
    """The text `lorasum predict --domains` prints."""
    rows = ", ".join(f"{n} {k}" for n, k in out["rows"].items())
    lines = [
        f"adapter-free predictors (model {out['model']}, train rows {rows}, max length "
        f"{out['max_length']}, {out['modules']} modules)",
        "  base loss (mean answer NLL, train rows): "
        + ", ".join(f"{n} {v:.4f}" for n, v in out["base_loss"].items()),
    ]
    forecasts = out["forecast"]
    head = f"  {'combination':<28} grad cos RMS    mean  global  loss mean  spread"
    lines.append(head + ("  predicted Δ% (95 % interval)" if forecasts else ""))
    for c, v in out["predictors"].items():
        line = (
            f"  {c:<28} {v['grad_cosine_rms']:12.4f} {v['grad_cosine_mean']:+7.4f} "
            f"{v['grad_cosine_global']:+7.4f} {v['base_loss_mean']:10.4f} "
            f"{v['base_loss_spread']:7.4f}"
        )
        if forecasts:
            f = forecasts[c]
            line += f"  {f['delta_pct']:+7.2f} ({f['low']:+.2f} … {f['high']:+.2f})"
        lines.append(line)
    if not forecasts:
        lines.append(
            "  no forecast: fitting Δ% needs finished studies that record these predictors "
            "(--fit STUDY_DIR)"
        )
        return "\n".join(lines)
    f = next(iter(forecasts.values()))
    how = "auto: best leave-one-out Spearman" if out["auto"] else "chosen"
    lines.append(
        f"  forecast from {out['predictor']} [{how}; {f['fit']['n']} points in "
        f"{f['n_groups']} combinations]"
    )
    ranks = ", ".join(
        f"{k} {v['spearman_rho']:.2f}" if v["spearman_rho"] is not None else f"{k} n/a"
        for k, v in out["ranking"].items()
    )
    oracle = {v.get("oracle_rho") for v in out["ranking"].values()} - {None}
    bound = f" (knowing each combination's mean Δ% exactly: {max(oracle):.2f})" if oracle else ""
    lines.append(f"  leave-one-out Spearman per predictor: {ranks}{bound}")
    lo, hi = f["range"]
    outside = [c for c, g in forecasts.items() if not lo <= g["x"] <= hi]
    if outside:
        lines.append(
            f"  caution: {out['predictor']} of {', '.join(outside)} lies outside the studies' "
            f"range [{lo:.4f}, {hi:.4f}]: the line is extrapolated"
        )
    return "\n".join(lines)
