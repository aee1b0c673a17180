"""`lorasum predict`: interference predictors of given adapters (and `compose --check`) or of
named domains before any training (`--domains`), and with finished studies the Δ% their sum
should show, fitted by `lorasum.analysis.forecast`.

- `predict_interference`: the weight- and activation-space predictors of two or more adapters
  (`lorasum.analysis.predictors`; the activation ones when the adapters' domains can be
  calibrated), the pair and modules that drive the chosen predictor (`drivers`), the forecast
  and the zero-training method the studies found best;
- `predict_domains`: the data-space predictors of every combination of named domains, from the
  base model and their training rows, and their forecast.

The studies are read before any model runs, so their mistakes cost nothing.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path

from lorasum.adapters import check_compatible, read_adapter, unique_names
from lorasum.analysis import forecast
from lorasum.analysis.gradients import DEFAULT_BATCH_SIZE, DEFAULT_MAX_BYTES
from lorasum.analysis.predictors import (
    ADAPTER_NEEDS,
    PredictorInputs,
    compute,
    families,
    predictor_names,
)
from lorasum.analysis.predictors.activation import (
    combination_predictors,
    interference_predictors,
)
from lorasum.analysis.predictors.data import combination_values, combo_name, gradient_statistics
from lorasum.analysis.predictors.weight import cosine_predictors
from lorasum.errors import LorasumError
from lorasum.factors import rms
from lorasum.models.loading import load_model, load_tokenizer
from lorasum.models.precision import pick_device
from lorasum.settings import DataSettings, LoraSettings, RuntimeSettings, field_problems

# --- `lorasum predict ADAPTER…` and `compose --check`: predictors of given adapters ------------


def _module_parts(p: dict, direction: str, kind: str) -> dict[str, float]:
    """Per module the additive part of one pair's directional predictor (direction 'b_to_a':
    adapter b on a's inputs), so that the parts sum to it: κ (``cross_talk``), β
    (``overshoot``: ⟨ΔW_j X_i, ΔW_i X_i⟩_m / Σ own) or κ⊥ (``orthogonal``: ‖ΔW_j X_i −
    β ΔW_i X_i‖²_m / Σ own)."""
    own = "energy_own_a" if direction == "b_to_a" else "energy_own_b"
    rows = p["modules"].values()
    total = sum(row.get(own, 0.0) for row in rows)
    if total <= 0:
        return {}
    energy, shared = f"energy_{direction}", f"shared_{direction}"
    if kind == "overshoot":
        return {m: row.get(shared, 0.0) / total for m, row in p["modules"].items()}
    if kind == "orthogonal":
        beta = p[f"overshoot_{direction}"] or 0.0
        return {
            m: (
                row.get(energy, 0.0) - 2 * beta * row.get(shared, 0.0) + beta**2 * row.get(own, 0.0)
            )
            / total
            for m, row in p["modules"].items()
        }
    return {m: row.get(energy, 0.0) / total for m, row in p["modules"].items()}


def drivers(result: dict, predictor: str, top: int = 5) -> dict:
    """The pair (or ordered pair, for cross-talk) that drives a predictor and its top modules.

    Cosine predictors: the pair with the largest |RMS cosine| and the modules with the largest
    share of its mean square (contribution c_m² / Σ c²). Cross-talk: the ordered pair with the
    largest κ_{j→i} and the modules with the largest part of it (‖ΔW_j X_i‖²_m / Σ_m
    ‖ΔW_i X_i‖²_m, which sum to κ).
    """
    pairs = result["pairs"]
    if not pairs:
        return {"pair": None, "modules": []}
    if predictor.endswith(("cross_talk", "overshoot")):
        kind = (
            "orthogonal"
            if "orthogonal" in predictor
            else "overshoot"
            if predictor.endswith("overshoot")
            else "cross_talk"
        )
        key = {"orthogonal": "orthogonal_cross_talk", "overshoot": "overshoot"}.get(kind, kind)
        options = []
        for p in pairs:
            for direction, (on, by) in (("b_to_a", (p["a"], p["b"])), ("a_to_b", (p["b"], p["a"]))):
                value = p[f"{key}_{direction}"]
                if value is not None:
                    options.append((value, on, by, direction, p))
        if not options:
            return {"pair": None, "modules": []}
        value, on, by, direction, p = max(options, key=lambda o: o[0])
        parts = _module_parts(p, direction, kind)
        label = f"{by} on {on}'s inputs"
    else:
        key = "activation_cosine" if "activation" in predictor else "cosine"
        field_name = "rms_activation_cosine" if "activation" in predictor else "rms_cosine"
        p = max(pairs, key=lambda q: abs(q[field_name]))
        value, label = p[field_name], f"{p['a']} + {p['b']}"
        squares = {m: row[key] ** 2 for m, row in p["modules"].items() if row.get(key) is not None}
        total = sum(squares.values())
        parts = {m: v / len(squares) for m, v in squares.items()} if total > 0 else {}
    ranked = sorted(parts.items(), key=lambda kv: -kv[1])[:top]
    total = sum(parts.values())
    return {
        "pair": label,
        "value": value,
        # part: the module's term of the predictor's sum (κ, or the mean square of cosines:
        # parts sum to it); share: part / total (shares sum to 1)
        "modules": [
            {"module": m, "part": v, "share": v / total if total > 0 else 0.0} for m, v in ranked
        ],
    }


def _fit_studies(fit: Sequence | None) -> tuple[list, dict]:
    """(the --fit studies, their predictor ranking); refuses studies without predictors."""
    studies = forecast.read_studies(fit) if fit else []
    ranking = forecast.rank_predictors(studies) if studies else {}
    if studies and not ranking:
        raise LorasumError(
            "the --fit studies have no predictor values (rms_cosine or predictors); "
            "rerun them with this version of lorasum"
        )
    return studies, ranking


def _measure_predictors(
    adapters: list, names: list[str], predictor: str, calibration: Sequence | None, model
) -> tuple[dict, dict, str | None]:
    """(per-pair result, combination predictor values, note): the activation predictors when
    calibration works (or is asked for), else the weight cosine alone, with why in the note."""
    from lorasum.analysis.calibration import calibrate_adapters, parse_calibration

    factors = {n: a.modules for n, a in zip(names, adapters, strict=True)}
    data = parse_calibration(calibration, len(adapters))
    union = sorted(set().union(*(a.modules for a in adapters)))
    note, calibrated = None, None
    if predictor == "rms_cosine":
        note = "activation predictors not computed (--predictor rms_cosine)"
    else:
        try:
            calibrated = calibrate_adapters(adapters, data, model=model, modules=union)
        except LorasumError as e:
            if predictor != "auto" or data is not None:
                raise
            note = f"activation predictors not computed: {e}"
    inputs = PredictorInputs(adapters=factors)
    if calibrated is not None:
        inputs.grams = dict(zip(names, calibrated, strict=True))
        result = interference_predictors(factors, inputs.grams)
        values = combination_predictors(result, names)
    else:  # the weight cosine needs no inputs
        result = cosine_predictors(factors)
        values = {"rms_cosine": rms([p["rms_cosine"] for p in result["pairs"]])}
    values.update(_other_families(values, inputs, [names])[combo_name(names)])
    return result, values, note


def _other_families(have: Mapping, inputs: PredictorInputs, combos) -> dict[str, dict]:
    """Combination name -> the values of every registered family ``inputs`` allow whose names
    ``have`` lacks (the weight and activation families' come with the per-pair result, the
    data family's with the gradient statistics); {} per combination when there is none."""
    rest = [f for f in families(inputs.available()) if not set(f.names) <= set(have)]
    return compute(rest, inputs, combos) if rest else {combo_name(c): {} for c in combos}


def _add_forecasts(
    out: dict, studies: list, chosen: str, values: dict, usable: list[str], predictor: str
) -> None:
    """Fill ``out``'s forecast, forecast_vs_singles and recommendations from the studies."""
    x0 = values.get(chosen)
    if x0 is None:
        raise LorasumError(f"predictor {chosen!r} is undefined for these adapters")
    out["forecast"] = forecast.forecast(studies, chosen, x0)
    # the sum vs each domain's own adapter: the part of Δ% the adapters determine (studies
    # from this version on record it); its own best predictor under 'auto'
    vs = "delta_vs_singles_pct"
    ranking_vs = forecast.rank_predictors(studies, target=vs)
    chosen_vs = forecast.best_predictor(ranking_vs, usable) if predictor == "auto" else chosen
    x_vs = values.get(chosen_vs) if chosen_vs else None
    if x_vs is not None and len(forecast.fit_points(studies, chosen_vs, vs)[0]) >= 3:
        try:
            out["forecast_vs_singles"] = forecast.forecast(studies, chosen_vs, x_vs, target=vs)
        except LorasumError:  # a constant predictor over those points: no line
            out["forecast_vs_singles"] = None
    # zero-training methods (the calibrated family needs validation data and a fit)
    plain = ("calibrated",)
    out["recommendation"] = forecast.recommend_method(studies, exclude_categories=plain)
    out["recommendation_nearby"] = forecast.recommend_method(
        studies, chosen, x0, nearest=3, exclude_categories=plain
    )


def predict_interference(
    paths: Sequence,
    fit: Sequence | None = None,
    predictor: str = "auto",
    calibration: Sequence | None = None,
    model: str | None = None,
    top: int = 5,
) -> dict:
    """`lorasum predict`: interference predictors of adapters and, with ``fit``, the Δ% the
    sum should show against merged-data training, fitted on finished studies.

    ``paths``: two or more adapters; ``fit``: study directories (results.json of `lorasum
    reproduce`); ``predictor``: a name of `combination_predictors` or 'auto' (the best
    leave-one-combination-out Spearman over the fit studies); ``calibration``: per adapter a
    comma list of sources or 'own' (default: each adapter's training data); ``model``: the
    base model for calibration. The studies are read before any model runs, so their mistakes
    cost nothing. Returns a dict (see `format_prediction`).
    """
    if len(paths) < 2:
        raise LorasumError(
            "predict needs at least two adapters (or --domains a,b for predictors before training)"
        )
    known = ("auto", *predictor_names(ADAPTER_NEEDS))
    if predictor not in known:
        raise LorasumError(f"unknown predictor {predictor!r}; choose one of: {', '.join(known)}")
    studies, ranking = _fit_studies(fit)
    adapters = [read_adapter(p, strict=True) for p in paths]
    check_compatible(adapters, fan_in_fan_out=False)
    names = unique_names(adapters)
    result, values, note = _measure_predictors(adapters, names, predictor, calibration, model)
    pairs = [{k: p[k] for k in p if k != "modules"} for p in result["pairs"]]
    usable = [k for k, v in values.items() if v is not None]
    if predictor == "auto":
        chosen = forecast.best_predictor(ranking, usable) if ranking else None
        chosen = chosen or ("max_cross_talk" if "max_cross_talk" in usable else "rms_cosine")
    else:
        chosen = predictor
    out = {
        "adapters": [str(a.path) for a in adapters],
        "names": names,
        "predictors": values,
        "predictor": chosen,
        "auto": predictor == "auto",
        "note": note,
        "pairs": pairs,
        "drivers": drivers(result, chosen, top),
        "ranking": ranking,
        "forecast": None,
        "forecast_vs_singles": None,
        "recommendation": None,
    }
    if studies:
        _add_forecasts(out, studies, chosen, values, usable, predictor)
    return out


def format_prediction(out: dict, warning: bool = False) -> str:
    """The text `lorasum predict` prints (``warning``: the shorter form of `compose --check`)."""
    lines = []
    values = ", ".join(f"{k} {v:.4f}" for k, v in out["predictors"].items() if v is not None)
    head = "interference check" if warning else "interference predictors"
    lines.append(f"{head} of {' + '.join(out['names'])}: {values}")
    if out.get("note"):
        lines.append(f"  note: {out['note']}")
    if not warning:
        for p in out["pairs"]:
            talk = (
                f", cross-talk {p['b']}→{p['a']} {p['cross_talk_b_to_a']:.3f}, "
                f"{p['a']}→{p['b']} {p['cross_talk_a_to_b']:.3f}"
                if p["cross_talk_b_to_a"] is not None and p["cross_talk_a_to_b"] is not None
                else ""
            )
            act = p["rms_activation_cosine"]
            act = "" if act is None else f", activation cosine {act:.4f}"
            lines.append(f"  {p['a']} + {p['b']}: RMS cosine {p['rms_cosine']:.4f}{act}{talk}")
    d = out["drivers"]
    if d.get("pair"):
        mods = ", ".join(f"{m['module']} ({m['share']:.0%})" for m in d["modules"][:3])
        lines.append(
            f"  driven by {d['pair']} ({out['predictor']} {d['value']:.4f}); top modules: {mods}"
        )
    f = out["forecast"]
    if f is None:
        lines.append(
            "  no forecast: fitting Δ% needs finished studies (--fit STUDY_DIR, the directory "
            "of a `lorasum reproduce` run)"
        )
        return "\n".join(lines)
    how = "auto: best leave-one-out Spearman" if out["auto"] else "chosen"
    rho = f["loo"]["spearman_rho"]
    lines.append(
        f"  predicted Δ% of the sum vs merged-data training: {f['delta_pct']:+.2f} % "
        f"(95 % prediction interval {f['low']:+.2f} … {f['high']:+.2f}) from {f['predictor']} "
        f"= {f['x']:.4f} [{how}; {f['fit']['n']} points in {f['n_groups']} combinations, "
        f"leave-one-out Spearman {'n/a' if rho is None else f'{rho:.2f}'}]"
    )
    v = out.get("forecast_vs_singles")
    if v is not None:
        rho_vs = v["loo"]["spearman_rho"]
        lines.append(
            f"  predicted change of the sum vs each domain's own adapter: {v['delta_pct']:+.2f} % "
            f"(95 % prediction interval {v['low']:+.2f} … {v['high']:+.2f}) from "
            f"{v['predictor']} = {v['x']:.4f} [{v['fit']['n']} points, leave-one-out Spearman "
            f"{'n/a' if rho_vs is None else f'{rho_vs:.2f}'}]"
        )
    lo, hi = f["range"]
    if not lo <= f["x"] <= hi:
        lines.append(
            f"  caution: {f['predictor']} = {f['x']:.4f} lies outside the studies' range "
            f"[{lo:.4f}, {hi:.4f}]: the line is extrapolated"
        )
    if not warning and out["ranking"]:
        ranks = ", ".join(
            f"{k} {v['spearman_rho']:.2f}" if v["spearman_rho"] is not None else f"{k} n/a"
            for k, v in out["ranking"].items()
        )
        oracle = {v.get("oracle_rho") for v in out["ranking"].values()} - {None}
        bound = (
            f" (knowing each combination's mean Δ% exactly: {max(oracle):.2f})" if oracle else ""
        )
        lines.append(f"  leave-one-out Spearman per predictor: {ranks}{bound}")
    rec = out["recommendation"]
    if rec is not None:
        near = out.get("recommendation_nearby")
        extra = (
            f"; in the {near['n_combinations']} nearest combinations: {near['method']} "
            f"({near['mean_delta_pct']:+.2f} %)"
            if near is not None and near["method"] != rec["method"]
            else ""
        )
        lines.append(
            f"  recommended method (no training): {rec['method']} (mean Δ% "
            f"{rec['mean_delta_pct']:+.2f} over "
            f"{rec['n_combinations']} study combinations{extra})"
        )
    return "\n".join(lines)


# --- `lorasum predict --domains`: before any training -------------------------------------------

# Training rows per domain the gradients are measured on where none is given: the standard
# preset's (presets/standard.yaml), so its studies are the ones a forecast matches by default
DOMAINS_MAX_TRAIN = 64


def _check_settings(predictor: str, max_length: int, max_train: int | None, max_order) -> None:
    problems = []
    known = ("auto", *predictor_names(needing="base_model_data"))
    if predictor not in known:
        problems.append(f"unknown predictor {predictor!r} (choose one of: {', '.join(known)})")
    problems += field_problems({"max_length": max_length, "max_train": max_train})
    if max_order is not None and max_order < 2:
        problems.append(f"--max-order {max_order}: combinations have at least 2 domains")
    if problems:
        raise LorasumError("; ".join(problems))


def _ranking(studies: list[dict]) -> dict:
    data_names = predictor_names(needing="base_model_data")
    names = [n for n in data_names if n in forecast.available_predictors(studies)]
    if not names:
        raise LorasumError(
            "the --fit studies carry no adapter-free predictors "
            f"({', '.join(data_names[:2])}, …); rerun them with a lorasum that records them"
        )
    return forecast.rank_predictors(studies, names)


def _domain_values(stats: dict, inputs: PredictorInputs, combos) -> dict[str, dict]:
    """Combination name -> the data family's predictors (from the gradient statistics) and
    those of any other registered family the base model and data allow."""
    values = {combo_name(c): combination_values(stats, c) for c in combos}
    if values:
        for c, extra in _other_families(next(iter(values.values())), inputs, combos).items():
            values[c].update(extra)
    return values


def predict_domains(
    domains: Mapping[str, str],
    *,
    model: str = RuntimeSettings.model,
    fit: Sequence[str | Path] | None = None,
    predictor: str = "auto",
    max_length: int = DataSettings.max_length,
    max_train: int | None = DOMAINS_MAX_TRAIN,
    split_seed: int = DataSettings.split_seed,
    target_modules: str | Sequence[str] = LoraSettings.target_modules,
    max_order: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_bytes: int = DEFAULT_MAX_BYTES,
    device: str = RuntimeSettings.device,
) -> dict:
    """`lorasum predict --domains`: the adapter-free predictors of every combination of 2 …
    ``max_order`` of the named domains (name -> source), before any training; with ``fit``
    (finished study directories whose rows carry these predictors) the Δ% forecast of each
    combination from ``predictor`` ('auto': the best leave-one-combination-out Spearman). The
    studies are read before the model runs. The values depend on the rows (``max_train``,
    ``split_seed``) and ``max_length``: match the studies' settings when forecasting."""
    from lorasum.data.split import load_split

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
    inputs = PredictorInputs(
        model=net, tokenizer=tokenizer, sources=sources, max_length=max_length, model_spec=model
    )
    values = _domain_values(stats, inputs, combos)
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
