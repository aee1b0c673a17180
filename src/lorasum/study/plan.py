"""Plan a study: every unit it is made of, with its key, dependencies, resources and cost.

`plan_study` only describes; nothing runs and nothing is written. `Plan.status` asks each unit
whether it is finished (in dependency order: a unit whose input will be recomputed will run
too), and `Plan.describe` prints units by kind, cached and to run, and the estimated time from
this machine's measured rates (`$LORASUM_HOME/rates.json`, written after each study).
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

from lorasum.data import Source
from lorasum.io import atomic_write_text
from lorasum.methods import get_method
from lorasum.models import lorasum_home
from lorasum.study.units import (
    KINDS,
    EvalSpec,
    Resources,
    Unit,
    cached_calibrated,
    cached_calibration,
    cached_compose,
    cached_predictors,
    cached_training,
    calibrate_unit,
    calibrated_unit,
    compose_unit,
    eval_unit,
    job_cost,
    predictors_unit,
    train_unit,
)
from lorasum.study_config import STUDY_ONLY_METHODS
from lorasum.train import TrainConfig, adapter_key

COMPOSE_COST_ROWS = 8  # a composition takes a few seconds: like evaluating ~8 rows


def combinations(names: list[str], max_order: int | None = None) -> list[tuple[str, ...]]:
    """Every combination of 2 … max_order domains (default: up to all of them)."""
    top = len(names) if max_order is None else min(max_order, len(names))
    return [c for k in range(2, top + 1) for c in itertools.combinations(names, k)]


def combo_name(combo: tuple[str, ...]) -> str:
    return "+".join(combo)


@dataclass(frozen=True)
class StudyLayout:
    """What the plan is built from: the resolved study and where its units live."""

    out: Path
    model: str
    names: list[str]
    domain_sources: dict[str, str]
    sources: dict[str, Source]
    base_cfg: TrainConfig
    seeds: list[int]
    seed_per_domain: bool
    combos: list[tuple[str, ...]]
    methods: dict[str, dict]  # every method but the sum, with its options
    variants: list[tuple[tuple[str, ...], tuple[str, ...], str]]  # (combo, pair, third)
    cross_domain: bool
    predictors: bool
    overwrite: bool

    def seed_dir(self, seed: int | None) -> Path:
        return self.out if seed is None else self.out / f"seed-{seed}"

    def test_rows(self, domains) -> int:
        return sum(len(self.sources[d].splits["test"]) for d in domains)

    @property
    def calibrating(self) -> bool:
        return self.predictors or any(
            m not in STUDY_ONLY_METHODS and get_method(m).calibration for m in self.methods
        )


def training_units(
    cfg: TrainConfig,
    domain_sources: dict[str, str],
    sources: dict[str, Source],
    names: list[str],
    combos: list[tuple[str, ...]],
    seed_per_domain: bool,
) -> list[tuple[str, TrainConfig, list[Source]]]:
    """One seed's trainings: an adapter per domain, a merged-data adapter per combination."""
    units = [((n,), n) for n in names] + [(c, f"merged-{combo_name(c)}") for c in combos]
    out = []
    for doms, unit in units:
        unit_seed = cfg.seed + (names.index(doms[0]) if seed_per_domain and len(doms) == 1 else 0)
        unit_cfg = replace(cfg, data=[domain_sources[d] for d in doms], seed=unit_seed)
        out.append((unit, unit_cfg, [sources[d] for d in doms]))
    return out


def _train_units(lay: StudyLayout) -> list[Unit]:
    units = []
    for seed in lay.seeds:
        cfg = replace(lay.base_cfg, seed=seed)
        plan = training_units(
            cfg, lay.domain_sources, lay.sources, lay.names, lay.combos, lay.seed_per_domain
        )
        for name, unit_cfg, srcs in plan:
            path = lay.seed_dir(seed) / "adapters" / name
            key = adapter_key(unit_cfg, srcs)
            rows = sum(len(s.splits["train"]) for s in srcs)
            units.append(
                Unit(
                    "train", seed, name, f"train {name} seed {seed}", train_unit,
                    (unit_cfg, path, srcs, lay.overwrite),
                    cost=job_cost("train", rows, lay.base_cfg.max_length),
                    resources=Resources(memory_gb=3.0),
                    output=path, key=key,
                    probe=partial(cached_training, path, key, lay.overwrite),
                )
            )  # fmt: skip
    return units


def _eval(lay: StudyLayout, seed, name, adapter_dir, domains, deps, unit_key=None) -> Unit:
    path = lay.seed_dir(seed) / "evals" / f"{name}.json"
    spec = EvalSpec(path, adapter_dir, unit_key, tuple(domains))
    return Unit(
        "eval", seed, name, f"eval {name}", eval_unit, (spec, lay.sources, lay.base_cfg),
        deps=tuple(deps), cost=job_cost("eval", lay.test_rows(domains), lay.base_cfg.max_length),
        output=path, key=None if unit_key is None else spec.key(lay.sources, lay.base_cfg),
        probe=partial(spec.cached, lay.sources, lay.base_cfg),
    )  # fmt: skip


def _compose(lay: StudyLayout, seed, name, paths, out, method, options, deps) -> Unit:
    cost = job_cost("eval", COMPOSE_COST_ROWS, lay.base_cfg.max_length)
    return Unit(
        "compose", seed, name, f"compose {name} seed {seed}", compose_unit,
        (paths, out, method, options, lay.overwrite), deps=tuple(deps), cost=cost, output=out,
        probe=partial(cached_compose, paths, out, method, options),
    )  # fmt: skip


def _seed_units(lay: StudyLayout, seed: int) -> list[Unit]:
    """Sums, variants, calibrations, predictors, methods and every evaluation of one seed."""
    d = lay.seed_dir(seed)
    adapters = d / "adapters"
    tid = {n: f"train/{seed}/{n}" for n in lay.names}
    tid.update({f"merged-{combo_name(c)}": f"train/{seed}/merged-{combo_name(c)}" for c in lay.combos})  # fmt: skip
    units: list[Unit] = []
    for n in lay.names:
        doms = tuple(lay.names) if lay.cross_domain else (n,)
        units.append(_eval(lay, seed, f"single-{n}", adapters / n, doms, [tid[n]]))
    for combo in lay.combos:
        c = combo_name(combo)
        merged = f"merged-{c}"
        units.append(_eval(lay, seed, merged, adapters / merged, combo, [tid[merged]]))
        paths = [adapters / x for x in combo]
        units.append(_compose(lay, seed, f"sum-{c}", paths, d / "sums" / c, "sum", {}, [tid[x] for x in combo]))  # fmt: skip
        units.append(_eval(lay, seed, f"sum-{c}", d / "sums" / c, combo, [f"compose/{seed}/sum-{c}"]))  # fmt: skip
    for combo, pair, third in lay.variants:
        name = f"variant-{combo_name(pair)}+{third}"
        out = d / "variants" / name.removeprefix("variant-")
        merged = f"merged-{combo_name(pair)}"
        paths = [adapters / merged, adapters / third]
        units.append(_compose(lay, seed, name, paths, out, "sum", {}, [tid[merged], tid[third]]))
        units.append(_eval(lay, seed, name, out, combo, [f"compose/{seed}/{name}"]))
    calib: dict[str, str] = {}  # domain -> its calibration unit
    if lay.calibrating:
        for n in lay.names:
            rows = len(lay.sources[n].splits["train"])
            units.append(
                Unit(
                    "calibrate", seed, f"calibrate-{n}", f"calibrate {n} seed {seed}",
                    calibrate_unit, (adapters / n,), deps=(tid[n],),
                    cost=job_cost("eval", rows, lay.base_cfg.max_length),
                    probe=partial(cached_calibration, adapters / n),
                )
            )  # fmt: skip
            calib[n] = f"calibrate/{seed}/calibrate-{n}"
    if lay.predictors:
        path = d / "predictors.json"
        args = (path, adapters, lay.names, lay.combos)
        units.append(
            Unit(
                "predictors", seed, "predictors", f"predictors seed {seed}", predictors_unit,
                args, deps=tuple(calib.values()), cost=job_cost("eval", COMPOSE_COST_ROWS, lay.base_cfg.max_length),
                output=path, probe=partial(cached_predictors, *args),
            )
        )  # fmt: skip
    units += _method_units(lay, seed, tid, calib)
    return units


def _method_units(lay: StudyLayout, seed: int, tid: dict, calib: dict) -> list[Unit]:
    d = lay.seed_dir(seed)
    units = []
    for m, opts in lay.methods.items():
        for combo in lay.combos:
            c = combo_name(combo)
            name = f"method-{m}-{c}"
            paths = [d / "adapters" / x for x in combo]
            out = d / "methods" / m / c
            deps = [tid[x] for x in combo]
            if m == "calibrated":
                merged = d / "adapters" / f"merged-{c}"
                args = (
                    paths, out, merged, [lay.sources[x] for x in combo], opts["fraction"],
                    lay.base_cfg.max_length, lay.overwrite,
                )  # fmt: skip
                units.append(
                    Unit(
                        "fit", seed, name, f"fit {name} seed {seed}", calibrated_unit, args,
                        deps=(*deps, tid[f"merged-{c}"]),
                        cost=job_cost("eval", COMPOSE_COST_ROWS, lay.base_cfg.max_length),
                        output=out, probe=partial(cached_calibrated, *args[:-1]),
                    )
                )  # fmt: skip
            else:
                if m not in STUDY_ONLY_METHODS and get_method(m).calibration:
                    deps += [calib[x] for x in combo]
                units.append(_compose(lay, seed, name, paths, out, m, opts, deps))
            kind = "fit" if m == "calibrated" else "compose"
            units.append(_eval(lay, seed, name, out, combo, [f"{kind}/{seed}/{name}"]))
    return units


def plan_study(lay: StudyLayout) -> Plan:
    """Every unit of the study, in dependency order (a unit after the units it reads)."""
    units = _train_units(lay)
    units.append(_eval(lay, None, "base", None, tuple(lay.names), [], unit_key=f"base:{lay.model}"))
    for seed in lay.seeds:
        units += _seed_units(lay, seed)
    return Plan(units)


@dataclass
class Plan:
    units: list[Unit]

    def __post_init__(self) -> None:
        ids = [u.id for u in self.units]
        if len(set(ids)) != len(ids):
            raise ValueError("a plan holds two units with one id")
        known = set()
        for u in self.units:
            missing = [d for d in u.deps if d not in known]
            if missing:
                raise ValueError(
                    f"unit {u.id} depends on {missing}, which come later or not at all"
                )
            known.add(u.id)

    def status(self) -> dict[str, bool]:
        """unit id → finished (its cached result is there and none of its inputs will change)."""
        done: dict[str, bool] = {}
        for u in self.units:
            done[u.id] = all(done[d] for d in u.deps) and u.cached() is not None
        return done

    def describe(self, workers: int) -> str:
        """Units by kind (cached / to run), and the estimated time of what would run."""
        status = self.status()
        lines = [f"{'unit kind':<12}{'total':>7}{'cached':>8}{'to run':>8}"]
        for kind in KINDS:
            of_kind = [u for u in self.units if u.kind == kind]
            if of_kind:
                cached = sum(status[u.id] for u in of_kind)
                lines.append(f"{kind:<12}{len(of_kind):>7}{cached:>8}{len(of_kind) - cached:>8}")
        cached = sum(status.values())
        lines.append(f"{'all':<12}{len(self.units):>7}{cached:>8}{len(self.units) - cached:>8}")
        to_run = [u for u in self.units if not status[u.id]]
        lines.append(estimate_line(to_run, read_rates(), workers))
        return "\n".join(lines)


# --- measured rates ------------------------------------------------------------------------------


def rates_path() -> Path:
    return lorasum_home() / "rates.json"


def read_rates() -> dict[str, float]:
    """Seconds per unit of cost, per unit kind, measured on this machine (empty: none yet)."""
    try:
        rates = json.loads(rates_path().read_text())
    except (OSError, ValueError):
        return {}
    return {k: float(v) for k, v in rates.items() if isinstance(v, int | float) and v > 0}


def record_rates(timings: list[tuple[str, float, float]]) -> None:
    """Update the rates from (kind, cost, seconds) of units run here (one worker's seconds)."""
    totals: dict[str, list[float]] = {}
    for kind, cost, seconds in timings:
        if cost > 0 and seconds and seconds > 0:
            t = totals.setdefault(kind, [0.0, 0.0])
            t[0] += cost
            t[1] += seconds
    if not totals:
        return
    rates = read_rates()
    rates.update({k: s / c for k, (c, s) in totals.items()})
    try:
        rates_path().parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(rates_path(), json.dumps(rates, indent=1, sort_keys=True))
    except OSError:
        pass  # a read-only home only loses the estimate


def estimate_line(to_run: list[Unit], rates: dict[str, float], workers: int) -> str:
    if not to_run:
        return "nothing to run: every unit is finished"
    unknown = sorted({u.kind for u in to_run if u.kind not in rates})
    if len(unknown) == len({u.kind for u in to_run}):
        return "estimated time: no rate measured on this machine yet (a first study records them)"
    seconds = sum(u.cost * rates[u.kind] for u in to_run if u.kind in rates) / max(1, workers)
    extra = f" (+ {', '.join(unknown)} units: no rate yet)" if unknown else ""
    return f"estimated time: {seconds / 60:.1f} min with {workers} worker(s){extra}"
