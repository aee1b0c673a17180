"""Plan a study: every task it is made of (`lorasum.study.tasks`), built from its layout.

`plan_study` only describes; nothing runs and nothing is written. Each task holds the tasks it
reads as fields, so the plan is a graph of objects: the executors walk it by
`Task.dependencies`, and the aggregation finds a task's result by the task. `Plan.status` asks
each task whether it is finished (in dependency order: a task whose input will be recomputed
will run too), and `Plan.describe` prints tasks by kind, cached and to run, and the estimated
time from this machine's measured rates (`$LORASUM_HOME/rates.json`, written after each study).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from lorasum.io import atomic_write_text
from lorasum.methods import get_method
from lorasum.models.loading import lorasum_home
from lorasum.study import names
from lorasum.study.layout import (
    StudyLayout,
    lora_a_policy,
    single_step_counts,
    snapshot_methods,
    snapshot_steps,
    step_at,
    validation_steps,
)
from lorasum.study.tasks import (
    KINDS,
    ROUTE_TASKS,
    AccuracyTask,
    AdapterTask,
    CalibrateTask,
    ComposeTask,
    DataPredictorsTask,
    DomainGradientsTask,
    EvalTask,
    FitTask,
    MergeAwareTask,
    NearestRouteTask,
    PredictorsTask,
    Task,
    TrainTask,
    VariantTask,
    fitted_task_type,
)


class Trainings:
    """One seed's trainings, found by what they train: an adapter per domain (under the `steps`
    budget one per step count it is composed at), a merged-data adapter per combination; with
    snapshots, each run also saves its adapter at the snapshot epochs (with merge_aware each
    single at every validation point)."""

    def __init__(self, lay: StudyLayout, seed: int):
        self.lay = lay
        cfg = replace(lay.base_cfg, seed=seed)
        # (domains, the steps a single is named by, max_steps: 0 = the schedule's own)
        runs = [((n,), None, 0) for n in lay.names]
        if lay.budget == "steps":
            runs = [
                ((d,), lay.single_steps(d, c), lay.merged_steps(c)) for c in lay.combos for d in c
            ]
            # every domain's own single (its smallest step count), also when a sample left it in
            # no combination: the single evaluations and the cross-domain matrix read it
            runs += [((n,), None, single_step_counts(lay, n)[0]) for n in lay.names]
            runs = list(dict.fromkeys(sorted(runs, key=lambda r: lay.names.index(r[0][0]))))
        runs += [(c, None, 0) for c in lay.merged_combos()]
        self.tasks = [self._task(cfg, *run) for run in runs]
        self._by_what = {(t.domains, t.named_steps): t for t in self.tasks}

    def _task(self, cfg, doms: tuple[str, ...], named_steps: int | None, max_steps: int):
        lay = self.lay
        single = len(doms) == 1
        unit_seed = cfg.seed + (lay.names.index(doms[0]) if lay.seed_per_domain and single else 0)
        unit_cfg = replace(cfg, data=[lay.domain_sources[d] for d in doms], seed=unit_seed)
        unit_cfg = lora_a_policy(unit_cfg, doms, lay.names, lay.equal_params)
        if max_steps:
            unit_cfg = replace(unit_cfg, max_steps=max_steps)
        if lay.snapshot_epochs:
            unit_cfg = replace(
                unit_cfg, snapshots=snapshot_steps(cfg, lay.train_rows(doms), lay.snapshot_epochs)
            )
        if lay.merge_aware and single:
            unit_cfg = replace(unit_cfg, snapshots=validation_steps(unit_cfg, lay.train_rows(doms)))
        name = names.training_name(doms, named_steps)
        return TrainTask(
            seed=cfg.seed,
            domains=doms,
            named_steps=named_steps,
            cfg=unit_cfg,
            sources=tuple(lay.sources[d] for d in doms),
            path=lay.seed_dir(cfg.seed) / "adapters" / name,
            overwrite=lay.overwrite,
        )

    def single(self, domain: str, combo=None) -> TrainTask:
        """The single adapter of ``domain`` that ``combo`` composes (None: the domain's own)."""
        return self._by_what[((domain,), self.lay.single_steps(domain, combo))]

    def singles_of(self, combo) -> tuple[TrainTask, ...]:
        return tuple(self.single(d, combo) for d in combo)

    def merged(self, combo) -> TrainTask:
        return self._by_what[(tuple(combo), None)]

    def singles(self) -> list[TrainTask]:
        """Every single adapter: each domain's own first, then the further step counts."""
        own = [self.single(n) for n in self.lay.names]
        return own + sorted(
            (t for t in self.tasks if t.single and t not in own), key=lambda t: t.name
        )


def _evaluations(
    lay: StudyLayout,
    seed,
    adapter: AdapterTask | None,
    domains,
    adapter_dir=None,
    snapshot=None,
    unit_key=None,
    twin: bool = True,
) -> list[EvalTask]:
    """The perplexity evaluation of ``adapter`` (its output, or ``adapter_dir``) and, with
    accuracy on (and ``twin``), its twin ``acc-<name>`` (`AccuracyTask`): same adapter, rows
    and dependencies, its own output and key."""
    if adapter is not None and adapter_dir is None:
        adapter_dir = adapter.output()
    kw = dict(
        seed=seed,
        domains=tuple(domains),
        sources=lay.sources,
        cfg=lay.base_cfg,
        seed_dir=lay.seed_dir(seed),
        adapter=adapter,
        adapter_dir=adapter_dir,
        snapshot=snapshot,
        unit_key=unit_key,
    )
    return [EvalTask(**kw)] + ([AccuracyTask(**kw)] if lay.accuracy and twin else [])


def _compose(
    lay: StudyLayout, seed, combo, method, singles, inputs=(), paths=None, out=None, snapshot=None
) -> ComposeTask:
    d = lay.seed_dir(seed)
    if out is None:
        c = names.combo_name(combo)
        out = d / "sums" / c if method == "sum" else d / "methods" / method / c
    return ComposeTask(
        seed=seed,
        combo=tuple(combo),
        method=method,
        options={} if method == "sum" else lay.methods[method],
        inputs=(*singles, *inputs),
        paths=tuple(t.path for t in singles) if paths is None else tuple(paths),
        out=out,
        max_length=lay.base_cfg.max_length,
        overwrite=lay.overwrite,
        snapshot=snapshot,
    )


def _seed_tasks(lay: StudyLayout, seed: int, runs: Trainings) -> list[Task]:
    """Sums, variants, calibrations, predictors, methods and every evaluation of one seed."""
    d = lay.seed_dir(seed)
    tasks: list[Task] = []
    for n in lay.names:
        doms = tuple(lay.names) if lay.cross_domain else (n,)
        tasks += _evaluations(lay, seed, runs.single(n), doms)
    for combo in lay.combos:
        tasks += _evaluations(lay, seed, runs.merged(combo), combo)
        summed = _compose(lay, seed, combo, "sum", runs.singles_of(combo))
        tasks += [summed, *_evaluations(lay, seed, summed, combo)]
    for combo, pair, third in lay.variants:
        parts = (runs.merged(pair), runs.single(third, combo))
        variant = VariantTask(
            seed=seed,
            combo=tuple(combo),
            method="sum",
            options={},
            inputs=parts,
            paths=tuple(t.path for t in parts),
            out=d / "variants" / names.variant_dir(pair, third),
            max_length=lay.base_cfg.max_length,
            overwrite=lay.overwrite,
            pair=tuple(pair),
            third=third,
        )
        tasks += [variant, *_evaluations(lay, seed, variant, combo)]
    calib: dict[TrainTask, CalibrateTask] = {}  # single adapter -> its calibration
    if lay.calibrating:
        calib = {t: CalibrateTask(seed=seed, single=t) for t in runs.singles()}
        tasks += calib.values()
    if lay.predictors:
        tasks.append(
            PredictorsTask(
                seed=seed,
                calibrations=tuple(calib[runs.single(n)] for n in lay.names),
                adapters=d / "adapters",
                domains=tuple(lay.names),
                combos=tuple(lay.combos),
                path=d / "predictors.json",
                max_length=lay.base_cfg.max_length,
            )
        )
    tasks += _method_tasks(lay, seed, runs, calib)
    tasks += _route_tasks(lay, seed, runs)
    tasks += _snapshot_tasks(lay, seed, runs)
    return tasks


def _method_tasks(lay: StudyLayout, seed: int, runs: Trainings, calib: dict) -> list[Task]:
    """Every method beside the sum on every combination: a composition (with the singles'
    calibrations where the method reads them) or a fit (`tasks.fitted_task_type`), and its
    evaluations."""
    d = lay.seed_dir(seed)
    tasks: list[Task] = []
    for m, opts in lay.methods.items():
        fitted = fitted_task_type(m)
        for combo in lay.combos:
            singles = runs.singles_of(combo)
            if fitted is None:
                reads = [calib[t] for t in singles] if get_method(m).calibration else []
                task: AdapterTask = _compose(lay, seed, combo, m, singles, reads)
            else:
                kw = dict(
                    seed=seed,
                    method=m,
                    combo=tuple(combo),
                    options=opts,
                    singles=singles,
                    merged=runs.merged(combo),
                    out=d / "methods" / m / names.combo_name(combo),
                    val_sources=tuple(lay.sources[x] for x in combo),
                    overwrite=lay.overwrite,
                )
                if fitted is MergeAwareTask:
                    task = MergeAwareTask(cfg=lay.base_cfg, **kw)
                else:
                    task = FitTask(max_length=lay.base_cfg.max_length, **kw)
            tasks += [task, *_evaluations(lay, seed, task, combo)]
    return tasks


def _route_tasks(lay: StudyLayout, seed: int, runs: Trainings) -> list[Task]:
    """The ``nearest``, ``gaussian``, ``mixture`` and ``arrow`` routes: one routed evaluation per combination, reading the
    singles it routes between (the ``oracle`` needs no task: the singles' evaluations give it)."""
    tasks: list[Task] = []
    for route, task_type in ROUTE_TASKS.items():
        if route not in lay.routes:
            continue
        prompt_level = issubclass(task_type, NearestRouteTask)  # nearest, gaussian, mixture
        extra = {"routers": lay.out / "routers"} if prompt_level else {}
        for combo in lay.combos:
            tasks.append(
                task_type(
                    seed=seed,
                    domains=tuple(combo),
                    sources=lay.sources,
                    cfg=lay.base_cfg,
                    seed_dir=lay.seed_dir(seed),
                    singles=runs.singles_of(combo),
                    **extra,
                )
            )
    return tasks


def _snapshot_tasks(lay: StudyLayout, seed: int, runs: Trainings) -> list[Task]:
    """At every snapshot but the last (the adapters themselves): each combination's merged-data
    snapshot and the sum (and data-free methods) of its singles' snapshots of equal epochs.
    Equal-steps pairs are read off these by the aggregation (a single at 2 epochs has the
    steps of a pair's merged adapter at 1)."""
    d = lay.seed_dir(seed)
    tasks: list[Task] = []
    for e in lay.snapshot_epochs[:-1]:
        tag = names.snapshot_label(e)
        for combo in lay.combos:
            merged = runs.merged(combo)
            tasks += _evaluations(
                lay, seed, merged, combo, snapshot_dir(lay, merged, e), e, twin=False
            )
            singles = runs.singles_of(combo)
            paths = [snapshot_dir(lay, t, e) for t in singles]
            c = names.combo_name(combo)
            for m in snapshot_methods(lay):
                out = d / "snapshots" / tag / (c if m == "sum" else f"{m}/{c}")
                composed = _compose(lay, seed, combo, m, singles, paths=paths, out=out, snapshot=e)
                tasks += [composed, *_evaluations(lay, seed, composed, combo, twin=False)]
    return tasks


def snapshot_dir(lay: StudyLayout, run: TrainTask, epochs: float) -> Path:
    """Where a training's snapshot at ``epochs`` lies (the adapter's own step count)."""
    return run.snapshot_dir(step_at(lay.base_cfg, lay.train_rows(run.domains), epochs))


def _data_predictor_tasks(lay: StudyLayout) -> list[Task]:
    """One gradients unit per domain of the combinations (seed independent, in the study
    directory) and the unit that compares them into the adapter-free predictors."""
    used = [n for n in lay.names if any(n in c for c in lay.combos)]
    grads = tuple(
        DomainGradientsTask(
            seed=None,
            domain=n,
            source=lay.sources[n],
            model_spec=lay.model,
            max_length=lay.base_cfg.max_length,
            path=lay.out / names.GRADIENTS_DIR / n,
        )
        for n in used
    )
    combine = DataPredictorsTask(
        seed=None,
        model_spec=lay.model,
        sources=lay.sources,
        gradients=grads,
        combos=tuple(lay.combos),
        max_length=lay.base_cfg.max_length,
        path=lay.out / "data_predictors.json",
    )
    return [*grads, combine]


def plan_study(lay: StudyLayout) -> Plan:
    """Every task of the study, in dependency order (a task after the tasks it reads)."""
    runs = {seed: Trainings(lay, seed) for seed in lay.seeds}
    tasks: list[Task] = [t for seed in lay.seeds for t in runs[seed].tasks]
    tasks += _evaluations(lay, None, None, lay.names, unit_key=f"base:{lay.model}")
    if lay.predictors:
        tasks += _data_predictor_tasks(lay)
    for seed in lay.seeds:
        tasks += _seed_tasks(lay, seed, runs[seed])
    return Plan(tasks, runs)


@dataclass
class Plan:
    """A study's tasks in dependency order, and each seed's trainings by what they train."""

    tasks: list[Task]
    trainings: dict[int, Trainings] = field(default_factory=dict)

    def __post_init__(self) -> None:
        ids = [t.id for t in self.tasks]
        if len(set(ids)) != len(ids):
            raise ValueError("a plan holds two tasks with one id")
        known: set[Task] = set()
        for t in self.tasks:
            missing = [d.id for d in t.dependencies() if d not in known]
            if missing:
                raise ValueError(
                    f"task {t.id} depends on {missing}, which come later or not at all"
                )
            known.add(t)

    def of_type(self, *types: type[Task]) -> list[Task]:
        """The plan's tasks of these types, in plan order."""
        return [t for t in self.tasks if isinstance(t, types)]

    def status(self, whole: Callable[[Task], bool] | None = None) -> dict[Task, bool]:
        """task → finished (its cached result is there and none of its inputs will change;
        with ``whole``, its output also passes that check, e.g. the study's ledger)."""
        done: dict[Task, bool] = {}
        for t in self.tasks:
            ok = all(done[d] for d in t.dependencies()) and (whole is None or whole(t))
            done[t] = ok and t.cached() is not None
        return done

    def describe(
        self, workers: int, profile: str = "", whole: Callable[[Task], bool] | None = None
    ) -> str:
        """Tasks by kind (cached / to run), and the estimated time of what would run."""
        status = self.status(whole)
        lines = [f"{'unit kind':<12}{'total':>7}{'cached':>8}{'to run':>8}"]
        for kind in KINDS:
            of_kind = [t for t in self.tasks if t.kind == kind]
            if of_kind:
                cached = sum(status[t] for t in of_kind)
                lines.append(f"{kind:<12}{len(of_kind):>7}{cached:>8}{len(of_kind) - cached:>8}")
        cached = sum(status.values())
        lines.append(f"{'all':<12}{len(self.tasks):>7}{cached:>8}{len(self.tasks) - cached:>8}")
        to_run = [t for t in self.tasks if not status[t]]
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


def estimate_line(to_run: list[Task], rates: dict[str, float], workers: int) -> str:
    if not to_run:
        return "nothing to run: every unit is finished"
    unknown = sorted({t.kind for t in to_run if t.kind not in rates})
    if len(unknown) == len({t.kind for t in to_run}):
        return (
            "estimated time: no rate measured yet for this model, device and precision on "
            "this machine (a first study records them)"
        )
    seconds = sum(t.cost() * rates[t.kind] for t in to_run if t.kind in rates) / max(1, workers)
    extra = f" (+ {', '.join(unknown)} units: no rate yet)" if unknown else ""
    return f"estimated time: {seconds / 60:.1f} min with {workers} worker(s){extra}"
