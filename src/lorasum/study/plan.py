"""Plan a study: every unit it is made of, with its key, dependencies, resources and cost.

`plan_study` only describes; nothing runs and nothing is written. `Plan.status` asks each unit
whether it is finished (in dependency order: a unit whose input will be recomputed will run
too), and `Plan.describe` prints units by kind, cached and to run, and the estimated time from
this machine's measured rates (`$LORASUM_HOME/rates.json`, written after each study).
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

from lorasum.data import Source
from lorasum.io import atomic_write_text
from lorasum.methods import get_method
from lorasum.models import lorasum_home
from lorasum.study.accuracy import PREFIX as ACCURACY_PREFIX
from lorasum.study.accuracy import AccuracySpec, accuracy_unit
from lorasum.study.accuracy import rows_cost as accuracy_rows_cost
from lorasum.study.config import STUDY_ONLY_METHODS
from lorasum.study.units import (
    KINDS,
    ArrowSpec,
    EvalSpec,
    Resources,
    RoutedSpec,
    Unit,
    arrow_eval_unit,
    cached_calibrated,
    cached_calibration,
    cached_compose,
    cached_data_predictors,
    cached_merge_aware,
    cached_predictors,
    cached_training,
    calibrate_unit,
    calibrated_unit,
    compose_unit,
    data_predictors_unit,
    eval_unit,
    job_cost,
    merge_aware_unit,
    predictors_unit,
    routed_eval_unit,
    train_unit,
)
from lorasum.train import TrainConfig, adapter_key, schedule_steps

COMPOSE_COST_ROWS = 8  # a composition takes a few seconds: like evaluating ~8 rows


def combinations(names: list[str], max_order: int | None = None) -> list[tuple[str, ...]]:
    """Every combination of 2 … max_order domains (default: up to all of them)."""
    top = len(names) if max_order is None else min(max_order, len(names))
    return [c for k in range(2, top + 1) for c in itertools.combinations(names, k)]


def combo_name(combo: tuple[str, ...]) -> str:
    return "+".join(combo)


def sample_combinations(combos: list[tuple[str, ...]], k: int, seed: int) -> list[tuple[str, ...]]:
    """``k`` of the combinations of each order (every one of an order that has at most ``k``),
    in their given order; ``k`` = 0 keeps all.

    Each order draws with its own generator, seeded by (``seed``, order), from its combinations
    sorted by their sorted domain names: the choice depends on the domain set, ``k``, ``seed``
    and the order only (not on the order in which domains are listed, the training seeds or
    the other orders present), so a rerun, another training seed or a higher max order keeps it.
    """
    if k <= 0:
        return list(combos)
    kept: set[tuple[str, ...]] = set()
    for order in sorted({len(c) for c in combos}):
        of_order = sorted(tuple(sorted(c)) for c in combos if len(c) == order)
        if len(of_order) > k:
            of_order = random.Random(f"lorasum-sample/{seed}/{order}").sample(of_order, k)
        kept.update(of_order)
    return [c for c in combos if tuple(sorted(c)) in kept]


def order_label(order: int, count: int | None = None) -> str:
    """pairs, triples, or combinations of N (singular when ``count`` is 1)."""
    one = count == 1
    if order == 2:
        return "pair" if one else "pairs"
    if order == 3:
        return "triple" if one else "triples"
    return f"combination{'' if one else 's'} of {order}"


def sample_summary(combos, available, k: int, seed: int) -> dict | None:
    """What results.json records of a sampled study (None when every combination runs): per
    order the combinations available and the ones kept, the totals, and a sentence saying it
    ('sampled 3 of 15 pairs and 3 of 20 triples (--sample 3, seed 0)')."""
    if k <= 0:
        return None
    orders = [
        {
            "order": n,
            "available": sum(len(c) == n for c in available),
            "kept": [list(c) for c in combos if len(c) == n],
        }
        for n in sorted({len(c) for c in available})
    ]
    parts = [
        f"{len(o['kept'])} of {o['available']} {order_label(o['order'], o['available'])}"
        for o in orders
    ]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return {
        "k": k,
        "seed": seed,
        "orders": orders,
        "available": len(available),
        "kept": len(combos),
        "description": f"sampled {text} (--sample {k}, seed {seed})",
    }


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
    budget: str = "epochs"  # study.config.BUDGETS
    snapshot_epochs: tuple[float, ...] = ()  # epochs along each run; the last is its length
    # with --sample: every combination of the grid (``combos`` is the sample run); None: all run
    available: tuple[tuple[str, ...], ...] | None = None
    sample: int = 0
    sample_seed: int = 0
    routes: tuple[str, ...] = ()  # lorasum.routing.ROUTES compared beside the methods
    merge_aware: bool = False  # singles keep a checkpoint at every validation point
    accuracy: bool = False  # metrics: [perplexity, accuracy]: an accuracy twin of each eval
    equal_params: bool = False  # frozen/disjoint singles at rank 2r, alpha 2α (config.py)

    @property
    def every_combo(self) -> list[tuple[str, ...]]:
        """Every combination of the grid, sampled or not."""
        return list(self.combos if self.available is None else self.available)

    def seed_dir(self, seed: int | None) -> Path:
        return self.out if seed is None else self.out / f"seed-{seed}"

    def test_rows(self, domains) -> int:
        return sum(len(self.sources[d].splits["test"]) for d in domains)

    def train_rows(self, domains) -> int:
        return sum(len(self.sources[d].splits["train"]) for d in domains)

    def merged_steps(self, combo) -> int:
        """Optimizer steps of a combination's merged-data adapter under the epochs schedule."""
        return schedule_steps(self.base_cfg, self.train_rows(combo))[1]

    def single(self, domain: str, combo=None) -> str:
        """The single adapter (unit name) of ``domain`` that ``combo`` composes: the domain's
        name, except under the `steps` budget where a domain in combinations of several step
        counts has one adapter per count (``math@24steps``; the smallest count keeps the name)."""
        if self.budget != "steps" or combo is None:
            return domain
        counts = single_step_counts(self, domain)
        steps = self.merged_steps(combo)
        return domain if steps == counts[0] else f"{domain}@{steps}steps"

    def singles(self) -> list[str]:
        """Every single adapter's unit name (a domain's own first)."""
        return list(self.names) + sorted(
            {self.single(d, c) for c in self.combos for d in c} - set(self.names)
        )

    def merged_combos(self) -> list[tuple[str, ...]]:
        """The combinations with a merged-data adapter: every combination run, and the pairs
        of the paper's triple variants (with --sample, a kept triple's pair may be left out
        as a combination; its merged-data adapter is still trained for the variant)."""
        pairs = [pair for _, pair, _ in self.variants if pair not in self.combos]
        return list(self.combos) + list(dict.fromkeys(pairs))

    @property
    def calibrating(self) -> bool:
        return self.predictors or any(
            m not in STUDY_ONLY_METHODS and get_method(m).calibration for m in self.methods
        )


def single_step_counts(lay: StudyLayout, domain: str) -> list[int]:
    """Under the `steps` budget: the distinct step counts of the merged-data adapters of the
    combinations that contain ``domain``, smallest first. Over the whole grid, sampled or not,
    so that a single adapter has the same name (and directory) in both."""
    return sorted({lay.merged_steps(c) for c in lay.every_combo if domain in c})


def snapshot_steps(cfg: TrainConfig, rows: int, epochs: tuple[float, ...]) -> list[int]:
    """The optimizer steps at which a run of ``rows`` training rows is at each of ``epochs``
    (the last entry is the run's end, which is the adapter itself)."""
    return sorted({step_at(cfg, rows, e) for e in epochs[:-1]})


def validation_steps(cfg: TrainConfig, rows: int) -> list[int]:
    """Every step at which a converged run over ``rows`` training rows may be validated (each
    ``eval_every`` steps up to its cap; a run that stops early reaches only some of them)."""
    cap = schedule_steps(cfg, rows)[2]
    return list(range(cfg.eval_every, cap + 1, cfg.eval_every))


def step_at(cfg: TrainConfig, rows: int, epochs: float) -> int:
    """The optimizer step at which a run over ``rows`` training rows has done ``epochs``."""
    return max(1, round(epochs * schedule_steps(cfg, rows)[0]))


def _lora_a_policy(
    cfg: TrainConfig, doms: tuple[str, ...], names: list[str], equal_params: bool = False
) -> TrainConfig:
    """A single adapter keeps the study's ``lora_a`` (``disjoint``: the domain's index is its
    slot; ``equal_params``: rank 2r and alpha 2α, the scale α/r kept); a merged-data adapter
    is the standard LoRA a user would otherwise train, at the study's rank."""
    if len(doms) > 1:
        return replace(cfg, lora_a="trained", a_slot=0, a_seed=0)
    if equal_params:
        cfg = replace(cfg, rank=2 * cfg.rank, alpha=2 * cfg.alpha)
    if cfg.lora_a == "disjoint":
        return replace(cfg, a_slot=names.index(doms[0]))
    return cfg


def training_units(
    cfg: TrainConfig,
    domain_sources: dict[str, str],
    sources: dict[str, Source],
    names: list[str],
    combos: list[tuple[str, ...]],
    seed_per_domain: bool,
    lay: StudyLayout | None = None,
) -> list[tuple[str, TrainConfig, list[Source]]]:
    """One seed's trainings: an adapter per domain (under the `steps` budget one per step
    count it is composed at), a merged-data adapter per combination; with snapshots, each
    run also saves its adapter at the snapshot epochs."""
    merged = combos if lay is None else lay.merged_combos()
    units = [((n,), n, 0) for n in names] + [(c, f"merged-{combo_name(c)}", 0) for c in merged]
    if lay is not None and lay.budget == "steps":
        units = [((d,), lay.single(d, c), lay.merged_steps(c)) for c in combos for d in c]
        # every domain's own single (its smallest step count), also when a sample left it in
        # no combination: the single evaluations and the cross-domain matrix read it
        units += [((n,), n, single_step_counts(lay, n)[0]) for n in names]
        units = list(dict.fromkeys(sorted(units, key=lambda u: names.index(u[0][0]))))
        units += [(c, f"merged-{combo_name(c)}", 0) for c in merged]
    out = []
    for doms, unit, max_steps in units:
        unit_seed = cfg.seed + (names.index(doms[0]) if seed_per_domain and len(doms) == 1 else 0)
        unit_cfg = replace(cfg, data=[domain_sources[d] for d in doms], seed=unit_seed)
        unit_cfg = _lora_a_policy(unit_cfg, doms, names, lay is not None and lay.equal_params)
        if max_steps:
            unit_cfg = replace(unit_cfg, max_steps=max_steps)
        if lay is not None and lay.snapshot_epochs:
            rows = sum(len(sources[d].splits["train"]) for d in doms)
            unit_cfg = replace(unit_cfg, snapshots=snapshot_steps(cfg, rows, lay.snapshot_epochs))
        if lay is not None and lay.merge_aware and len(doms) == 1:
            rows = sum(len(sources[d].splits["train"]) for d in doms)
            unit_cfg = replace(unit_cfg, snapshots=validation_steps(unit_cfg, rows))
        out.append((unit, unit_cfg, [sources[d] for d in doms]))
    return out


def _train_units(lay: StudyLayout) -> list[Unit]:
    units = []
    for seed in lay.seeds:
        cfg = replace(lay.base_cfg, seed=seed)
        plan = training_units(
            cfg, lay.domain_sources, lay.sources, lay.names, lay.combos, lay.seed_per_domain, lay
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


def _evals(lay: StudyLayout, seed, name, adapter_dir, domains, deps, unit_key=None) -> list[Unit]:
    """The perplexity evaluation and, with accuracy on, its twin ``acc-<name>``
    (`study.accuracy`): same adapter, rows and dependencies, its own output and key."""
    units = [_eval(lay, seed, name, adapter_dir, domains, deps, unit_key)]
    if lay.accuracy:
        units.append(_accuracy_eval(lay, seed, name, adapter_dir, domains, deps, unit_key))
    return units


def _accuracy_eval(lay: StudyLayout, seed, name, adapter_dir, domains, deps, unit_key) -> Unit:
    name = f"{ACCURACY_PREFIX}{name}"
    path = lay.seed_dir(seed) / "evals" / f"{name}.json"
    spec = AccuracySpec(path, adapter_dir, unit_key, tuple(domains))
    rows = accuracy_rows_cost(lay.sources, domains, spec.max_new_tokens)
    return Unit(
        "eval", seed, name, f"eval {name}", accuracy_unit, (spec, lay.sources, lay.base_cfg),
        deps=tuple(deps), cost=job_cost("eval", max(rows, 1), lay.base_cfg.max_length),
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
    tid = {n: f"train/{seed}/{n}" for n in lay.singles()}
    tid.update({f"merged-{combo_name(c)}": f"train/{seed}/merged-{combo_name(c)}" for c in lay.merged_combos()})  # fmt: skip
    units: list[Unit] = []
    for n in lay.names:
        doms = tuple(lay.names) if lay.cross_domain else (n,)
        units += _evals(lay, seed, f"single-{n}", adapters / n, doms, [tid[n]])
    for combo in lay.combos:
        c = combo_name(combo)
        merged = f"merged-{c}"
        units += _evals(lay, seed, merged, adapters / merged, combo, [tid[merged]])
        singles = [lay.single(x, combo) for x in combo]
        paths = [adapters / x for x in singles]
        units.append(_compose(lay, seed, f"sum-{c}", paths, d / "sums" / c, "sum", {}, [tid[x] for x in singles]))  # fmt: skip
        units += _evals(lay, seed, f"sum-{c}", d / "sums" / c, combo, [f"compose/{seed}/sum-{c}"])  # fmt: skip
    for combo, pair, third in lay.variants:
        name = f"variant-{combo_name(pair)}+{third}"
        out = d / "variants" / name.removeprefix("variant-")
        merged, single = f"merged-{combo_name(pair)}", lay.single(third, combo)
        paths = [adapters / merged, adapters / single]
        units.append(_compose(lay, seed, name, paths, out, "sum", {}, [tid[merged], tid[single]]))
        units += _evals(lay, seed, name, out, combo, [f"compose/{seed}/{name}"])
    calib: dict[str, str] = {}  # single adapter -> its calibration unit
    if lay.calibrating:
        for n in lay.singles():
            rows = len(lay.sources[n.split("@")[0]].splits["train"])
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
                args, deps=tuple(calib[n] for n in lay.names), cost=job_cost("eval", COMPOSE_COST_ROWS, lay.base_cfg.max_length),
                output=path, probe=partial(cached_predictors, *args),
            )
        )  # fmt: skip
    units += _method_units(lay, seed, tid, calib)
    units += _route_units(lay, seed, tid)
    units += _snapshot_units(lay, seed, tid)
    return units


def _route_units(lay: StudyLayout, seed: int, tid: dict) -> list[Unit]:
    """The ``nearest``, ``gaussian`` and ``arrow`` routes: one routed evaluation per
    combination, reading the singles it routes between (the ``oracle`` needs no unit: the
    singles' evaluations give it)."""
    from lorasum.routing import GAUSSIAN_PROMPTS

    units = []
    for route in ("nearest", "gaussian", "arrow"):
        if route not in lay.routes:
            continue
        for combo in lay.combos:
            name = f"route-{route}-{combo_name(combo)}"
            singles = [lay.single(x, combo) for x in combo]
            adapters = tuple((x, lay.seed_dir(seed) / "adapters" / s) for x, s in zip(combo, singles, strict=True))  # fmt: skip
            path = lay.seed_dir(seed) / "evals" / f"{name}.json"
            if route in ("nearest", "gaussian"):
                spec = RoutedSpec(path, adapters, lay.out / "routers", route)
                fn = routed_eval_unit
                # scoring the test rows, plus (once per domain, then cached) its training prompts
                prompts = lay.train_rows(combo)
                if route == "gaussian":
                    prompts = min(prompts, GAUSSIAN_PROMPTS * len(combo))
                rows = lay.test_rows(combo) * 2 + prompts // 3
            else:
                spec, fn = ArrowSpec(path, adapters), arrow_eval_unit
                rows = lay.test_rows(combo) * 2  # every token through every adapter
            units.append(
                Unit(
                    "eval", seed, name, f"eval {name} seed {seed}", fn,
                    (spec, lay.sources, lay.base_cfg), deps=tuple(tid[x] for x in singles),
                    cost=job_cost("eval", rows, lay.base_cfg.max_length), output=path,
                    probe=partial(spec.cached, lay.sources, lay.base_cfg),
                )
            )  # fmt: skip
    return units


def snapshot_label(epochs: float) -> str:
    return f"{epochs:g}ep"


def snapshot_dir(lay: StudyLayout, seed: int, unit: str, domains, epochs: float) -> Path:
    """Where a training's snapshot at ``epochs`` lies (the adapter's own step count)."""
    step = step_at(lay.base_cfg, lay.train_rows(domains), epochs)
    return lay.seed_dir(seed) / "adapters" / unit / "snapshots" / f"step-{step}"


def snapshot_methods(lay: StudyLayout) -> list[str]:
    """The methods evaluated at every snapshot: the sum and the data-free methods (those that
    need no calibration statistics of each snapshot)."""
    return ["sum"] + [
        m for m in lay.methods if m not in STUDY_ONLY_METHODS and not get_method(m).calibration
    ]


def _snapshot_units(lay: StudyLayout, seed: int, tid: dict) -> list[Unit]:
    """At every snapshot but the last (the adapters themselves): each combination's merged-data
    snapshot and the sum (and data-free methods) of its singles' snapshots of equal epochs.
    Equal-steps pairs are read off these by the aggregation (a single at 2 epochs has the
    steps of a pair's merged adapter at 1)."""
    d = lay.seed_dir(seed)
    units: list[Unit] = []
    for e in lay.snapshot_epochs[:-1]:
        tag = snapshot_label(e)
        for combo in lay.combos:
            c = combo_name(combo)
            merged = f"merged-{c}"
            merged_dir = snapshot_dir(lay, seed, merged, combo, e)
            units.append(_eval(lay, seed, f"snap-{tag}-{merged}", merged_dir, combo, [tid[merged]]))
            paths = [snapshot_dir(lay, seed, x, (x,), e) for x in combo]
            for m in snapshot_methods(lay):
                name = f"snap-{tag}-{'sum' if m == 'sum' else 'method-' + m}-{c}"
                out = d / "snapshots" / tag / (c if m == "sum" else f"{m}/{c}")
                opts = {} if m == "sum" else lay.methods[m]
                units.append(_compose(lay, seed, name, paths, out, m, opts, [tid[x] for x in combo]))  # fmt: skip
                units.append(_eval(lay, seed, name, out, combo, [f"compose/{seed}/{name}"]))
    return units


def _method_units(lay: StudyLayout, seed: int, tid: dict, calib: dict) -> list[Unit]:
    d = lay.seed_dir(seed)
    units = []
    for m, opts in lay.methods.items():
        for combo in lay.combos:
            c = combo_name(combo)
            name = f"method-{m}-{c}"
            singles = [lay.single(x, combo) for x in combo]
            paths = [d / "adapters" / x for x in singles]
            out = d / "methods" / m / c
            deps = [tid[x] for x in singles]
            if m == "merge_aware":
                merged = d / "adapters" / f"merged-{c}"
                args = (paths, out, merged, [lay.sources[x] for x in combo], opts, lay.base_cfg,
                        lay.overwrite)  # fmt: skip
                units.append(
                    Unit(
                        "fit", seed, name, f"fit {name} seed {seed}", merge_aware_unit, args,
                        deps=(*deps, tid[f"merged-{c}"]),
                        cost=job_cost("eval", COMPOSE_COST_ROWS, lay.base_cfg.max_length),
                        output=out, probe=partial(cached_merge_aware, *args[:-1]),
                    )
                )  # fmt: skip
            elif m in STUDY_ONLY_METHODS:
                merged = d / "adapters" / f"merged-{c}"
                args = (
                    m, paths, out, merged, [lay.sources[x] for x in combo], opts,
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
                    deps += [calib[x] for x in singles]
                units.append(_compose(lay, seed, name, paths, out, m, opts, deps))
            kind = "fit" if m in STUDY_ONLY_METHODS else "compose"
            units += _evals(lay, seed, name, out, combo, [f"{kind}/{seed}/{name}"])
    return units


def plan_study(lay: StudyLayout) -> Plan:
    """Every unit of the study, in dependency order (a unit after the units it reads)."""
    units = _train_units(lay)
    units += _evals(lay, None, "base", None, tuple(lay.names), [], unit_key=f"base:{lay.model}")
    if lay.predictors:
        args = (lay.out / "data_predictors.json", lay.model, lay.sources, lay.combos, lay.base_cfg.max_length)  # fmt: skip
        rows = lay.train_rows(lay.names)
        units.append(
            Unit(
                "predictors", None, "data-predictors", "predictors of the data", data_predictors_unit,
                args, cost=job_cost("train", rows, lay.base_cfg.max_length), output=args[0],
                resources=Resources(memory_gb=4.0), probe=partial(cached_data_predictors, *args),
            )
        )  # fmt: skip
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

    def status(self, whole: Callable[[Unit], bool] | None = None) -> dict[str, bool]:
        """unit id → finished (its cached result is there and none of its inputs will change;
        with ``whole``, its output also passes that check, e.g. the study's ledger)."""
        done: dict[str, bool] = {}
        for u in self.units:
            ok = all(done[d] for d in u.deps) and (whole is None or whole(u))
            done[u.id] = ok and u.cached() is not None
        return done

    def describe(
        self, workers: int, profile: str = "", whole: Callable[[Unit], bool] | None = None
    ) -> str:
        """Units by kind (cached / to run), and the estimated time of what would run."""
        status = self.status(whole)
        lines = [f"{'unit kind':<12}{'total':>7}{'cached':>8}{'to run':>8}"]
        for kind in KINDS:
            of_kind = [u for u in self.units if u.kind == kind]
            if of_kind:
                cached = sum(status[u.id] for u in of_kind)
                lines.append(f"{kind:<12}{len(of_kind):>7}{cached:>8}{len(of_kind) - cached:>8}")
        cached = sum(status.values())
        lines.append(f"{'all':<12}{len(self.units):>7}{cached:>8}{len(self.units) - cached:>8}")
        to_run = [u for u in self.units if not status[u.id]]
        lines.append(estimate_line(to_run, read_rates(profile), workers))
        return "\n".join(lines)


# --- measured rates ------------------------------------------------------------------------------


def rates_path() -> Path:
    return lorasum_home() / "rates.json"


def rate_profile(lay: StudyLayout, device, bf16: bool) -> str:
    """What a unit's seconds per unit of cost depend on beyond the cost itself: the model, the
    device kind, the precision and the row length (a cost unit is a row of ``max_length``)."""
    precision = "bf16" if bf16 else "fp32"
    return f"{lay.model}|{getattr(device, 'type', device)}|{precision}|{lay.base_cfg.max_length}"


def read_rates(profile: str = "") -> dict[str, float]:
    """Seconds per unit of cost, per unit kind, measured on this machine for ``profile`` (see
    `rate_profile`; empty: none measured yet)."""
    try:
        rates = json.loads(rates_path().read_text()).get("profiles", {}).get(profile, {})
    except (OSError, ValueError, AttributeError):
        return {}
    return {k: float(v) for k, v in rates.items() if isinstance(v, int | float) and v > 0}


def record_rates(timings: list[tuple[str, float, float]], profile: str = "") -> None:
    """Update ``profile``'s rates from (kind, cost, seconds) of units run here (one worker's
    seconds). Rates of other models, devices or precisions are kept beside them."""
    totals: dict[str, list[float]] = {}
    for kind, cost, seconds in timings:
        if cost > 0 and seconds and seconds > 0:
            t = totals.setdefault(kind, [0.0, 0.0])
            t[0] += cost
            t[1] += seconds
    if not totals:
        return
    try:
        data = json.loads(rates_path().read_text())
        profiles = data["profiles"] if isinstance(data.get("profiles"), dict) else {}
    except (OSError, ValueError, AttributeError, KeyError):
        profiles = {}  # none yet, or the old unkeyed file: its rates mixed models
    rates = read_rates(profile)
    rates.update({k: s / c for k, (c, s) in totals.items()})
    profiles[profile] = rates
    try:
        rates_path().parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"profiles": profiles}, indent=1, sort_keys=True)
        atomic_write_text(rates_path(), text)
    except OSError:
        pass  # a read-only home only loses the estimate


def estimate_line(to_run: list[Unit], rates: dict[str, float], workers: int) -> str:
    if not to_run:
        return "nothing to run: every unit is finished"
    unknown = sorted({u.kind for u in to_run if u.kind not in rates})
    if len(unknown) == len({u.kind for u in to_run}):
        return (
            "estimated time: no rate measured yet for this model, device and precision on "
            "this machine (a first study records them)"
        )
    seconds = sum(u.cost * rates[u.kind] for u in to_run if u.kind in rates) / max(1, workers)
    extra = f" (+ {', '.join(unknown)} units: no rate yet)" if unknown else ""
    return f"estimated time: {seconds / 60:.1f} min with {workers} worker(s){extra}"
