"""`lorasum reproduce`: the naive-summation study, planned into cached units and executed.

Per domain one adapter; per combination of ≥ 2 domains a merged-data adapter (same
hyper-parameters) and the exact naive sum of the domain adapters; perplexities on the
combination's test set (union of its domains' test splits) and per domain; Δ% of sum vs merged;
RMS cosine per combination; Pearson r and least-squares line of Δ% on RMS cosine.

settings (`study.config`) → `study.plan.plan_study` (units with keys, dependencies, cost) →
an executor (`study.executors`) runs what is not finished → `study.results` aggregates the
finished units into results.json → `report`. Every unit is written atomically with its key; a
restarted run reuses what finished.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from lorasum._version import __version__
from lorasum.adapters import read_adapter
from lorasum.analysis.forecast import loo_prediction
from lorasum.analysis.similarity import similarity_matrix
from lorasum.analysis.statistics import correlation
from lorasum.data.split import load_configured_split
from lorasum.errors import LorasumError
from lorasum.io import atomic_write_text, config_key, write_json
from lorasum.models.loading import load_model, load_tokenizer, resolve_target_modules
from lorasum.models.precision import (
    PRECISION_ENV,
    autocast_dtype,
    pick_device,
    resolve_precision,
    settle_cpu_bf16,
)
from lorasum.results_schema import (
    AccuracySummary,
    Base,
    Combination,
    Correlation,
    Pair,
    Results,
    Single,
    Snapshots,
    TrainingBudget,
)
from lorasum.settings import TrainConfig
from lorasum.study import names
from lorasum.study.accuracy import add_accuracy, seed_accuracy, study_accuracy
from lorasum.study.budget import budget_summary, snapshot_summary
from lorasum.study.config import (  # noqa: F401
    BUDGETS,
    EXPERIMENT_KEYS,
    STUDY_ONLY_METHODS,
    StudyConfig,
    parse_domains,
    study_identity,
)
from lorasum.study.executors import LocalExecutor, auto_workers, execute
from lorasum.study.layout import (
    StudyLayout,
    combinations,
    sample_combinations,
    sample_summary,
    snapshot_methods,
    step_at,
)
from lorasum.study.ledger import Ledger, verify_units
from lorasum.study.lock import is_lock_file, study_lock
from lorasum.study.plan import Plan, plan_study, rate_profile, record_rates
from lorasum.study.results import (
    aggregate_combination,
    cross_domain,
    manifest,
    mean,
    paper_comparison,
    seed_rows,
    statistics,
    train_curves,
)
from lorasum.study.tasks import (
    DataPredictorsTask,
    FittedTask,
    PredictorsTask,
    ScoredTask,
    TrainTask,
)
from lorasum.study.tasks.evaluate import read_json_or_none
from lorasum.training.schedule import val_rows_problem

EXECUTORS = ("local", "ray")


class StudyProgress:
    """The study's bar: work done (≈ tokens; ETA from the measured speed), units done / total,
    and the unit that finished last."""

    def __init__(self, bar, n_units: int):
        self.bar, self.n_units, self.done, self.last = bar, n_units, 0, ""

    def set_postfix_str(self, name: str) -> None:
        self.last = name

    def update(self, cost: float) -> None:
        self.done += 1
        self.bar.set_postfix_str(f"{self.done}/{self.n_units} units, {self.last}".rstrip(", "))
        if self.bar.total is not None:  # float sums in another order can overshoot by 1e-12
            cost = max(0.0, min(cost, self.bar.total - self.bar.n))
        self.bar.update(cost)
        self.last = ""

    def close(self) -> None:
        self.bar.close()


@dataclass
class Study:
    """A resolved study: its settings, identity and layout, before anything runs."""

    cfg: StudyConfig
    identity: dict  # what the trained units depend on (config.json, the study key)
    key: str
    layout: StudyLayout
    previous: dict | None  # the config.json found in the directory


def resolve(out: str | Path, preset, config, overrides: dict, overwrite: bool) -> Study:
    """Settings, data splits (checked) and the unit layout; refuses a directory it must not
    touch. Nothing is written."""
    from lorasum.study.config import resolve_study

    study_cfg = resolve_study(preset, config, overrides)
    train_settings = {**study_cfg.train, "eval_val": False}
    train_settings.setdefault("seed", study_cfg.seeds[0])
    base_cfg = TrainConfig(model=study_cfg.model, data=["-"], **train_settings)
    # one precision per study, settled here (flag, else $LORASUM_PRECISION, else this device's
    # verdict) and part of its identity: every unit, worker and actor runs in it
    device = pick_device(base_cfg.device)
    base_cfg = replace(base_cfg, precision=resolve_precision(base_cfg.precision, device))
    out = Path(out)
    # What the trained units depend on (`StudyConfig` fields marked key, study_identity);
    # methods and extra rows are units of their own, so a rerun with more methods reuses it.
    train_identity = {k: v for k, v in base_cfg.identity().items() if k != "seed"}
    identity = study_identity(study_cfg, train_identity, __version__)
    key = config_key(identity)
    previous = _check_out_dir(out, key, overwrite, base_cfg.precision)
    sources = _load_sources(study_cfg.domains, base_cfg)
    if study_cfg.accuracy:
        _check_scorable(sources)
    return Study(
        study_cfg, identity, key, _layout(out, study_cfg, base_cfg, sources, overwrite), previous
    )


def _check_scorable(sources: dict) -> None:
    """Refuse accuracy where no domain's test split has a row it can score."""
    from lorasum.accuracy import row_kind

    if not any(row_kind(qa) != "skip" for s in sources.values() for qa in s.splits["test"]):
        raise LorasumError(
            f"metrics accuracy: no test row of {', '.join(sources)} has options or a short "
            "answer, so accuracy has nothing to score; give multiple-choice rows a choices "
            "field (docs/MANUAL.md, 'Task accuracy') or drop accuracy from --metrics"
        )


def _check_out_dir(out: Path, key: str, overwrite: bool, precision: str) -> dict | None:
    if out.exists() and not out.is_dir():
        raise LorasumError(f"output path {out} is a file; choose another --out")
    cfg_path = out / "config.json"
    previous = read_json_or_none(cfg_path) if cfg_path.is_file() else None
    if previous is not None:
        was = (previous.get("train") or {}).get("precision")
        if (
            previous.get("key") != key
            and not overwrite
            and was in ("bf16", "fp32")
            and was != precision
        ):
            raise LorasumError(
                f"{out} holds a study run in {was}; this run would use {precision} (from "
                f"--precision, ${PRECISION_ENV} or this CPU's verdict); pass --precision {was} "
                "to continue it, or choose a new --out or pass --overwrite"
            )
        if previous.get("key") != key and not overwrite:
            raise LorasumError(
                f"{out} holds a study with different settings; choose a new --out or pass --overwrite"
            )
    elif out.is_dir() and any(not is_lock_file(p.name) for p in out.iterdir()):
        # --overwrite never deletes or mixes into a directory that is not a lorasum study.
        raise LorasumError(
            f"output directory {out} is not empty and holds no lorasum study; choose a new --out"
        )
    return previous


def _load_sources(domain_sources: dict[str, str], cfg: TrainConfig) -> dict:
    sources = {}
    for n, src in domain_sources.items():
        s = load_configured_split(src, cfg)
        s.name = n
        for split in ("train", "test"):
            if not s.splits[split]:
                raise LorasumError(f"domain {n}: the {split} split is empty; use more data")
        problem = val_rows_problem(cfg, [s])  # the merged adapters' unions are larger
        if problem:
            raise LorasumError(problem)
        sources[n] = s
    return sources


def _layout(out, study_cfg: StudyConfig, base_cfg, sources, overwrite) -> StudyLayout:
    domains = list(study_cfg.domains)
    every = combinations(domains, study_cfg.max_order)
    combos = sample_combinations(every, study_cfg.sample, study_cfg.sample_seed)
    variants = []
    if study_cfg.paper_variants and (study_cfg.max_order is None or study_cfg.max_order >= 3):
        variants = [
            (combo, tuple(d for d in combo if d != third), third)
            for combo in combos
            if len(combo) == 3
            for third in combo
        ]
    # the settings StudyLayout names as StudyConfig does (model, seeds, budget, ...) pass as set
    shared = [f.name for f in fields(StudyLayout) if f.name in EXPERIMENT_KEYS]
    same = {name: getattr(study_cfg, name) for name in shared}
    return StudyLayout(
        **{
            **same,
            "out": out,
            "names": domains,
            "domain_sources": study_cfg.domains,
            "sources": sources,
            "base_cfg": base_cfg,
            "combos": combos,
            "methods": _layout_methods(study_cfg),
            "variants": variants,
            "overwrite": overwrite,
            "snapshot_epochs": tuple(study_cfg.snapshots),
            "available": tuple(every) if study_cfg.sample else None,
            "routes": tuple(study_cfg.routes),
            "accuracy": study_cfg.accuracy,
        }
    )


def _layout_methods(study_cfg: StudyConfig) -> dict[str, dict]:
    """The study's methods beside the sum, with ``merge_aware`` where the study keeps the
    singles' checkpoints for it."""
    methods = {m: o for m, o in study_cfg.methods.items() if m != "sum"}
    if study_cfg.merge_aware:
        methods["merge_aware"] = dict(STUDY_ONLY_METHODS["merge_aware"])
    return methods


def reproduce(
    out: str | Path,
    preset: str | None = "quick",
    *,
    config: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    executor: str = "local",
    ray_address: str | None = None,
    plan_only: bool = False,
    verify: bool = False,
    wait: bool = False,
    **settings,
) -> dict:
    """`lorasum reproduce`: run the study; write results.json, report.md/html and plots.

    Settings: the ``preset`` (a YAML file shipped in the package), then the experiment file
    ``config``, then ``settings`` (`study.config.SETTING_NAMES`: the experiment file's keys,
    model, domains, seeds, methods, …, and the training settings, rank, lr, …; None = not
    given); see `lorasum.study.config`.
    ``executor``: "local" (worker processes here) or "ray" (Ray actors; ``ray_address`` "auto"
    or HOST:PORT of a running cluster, None: a local Ray instance).
    ``plan_only``: describe the plan (units by kind, cached / to run, estimated time) and
    return it without running or writing anything. ``verify``: check every finished unit's
    output against the study's ledger (`study.ledger`) without running or writing anything.
    A run holds the study directory's lock (`study.lock`); another run on it is refused at
    once, or with ``wait`` waits for it.
    """
    t_start = time.perf_counter()
    if executor not in EXECUTORS:
        raise LorasumError(f"--executor {executor!r}: use one of {', '.join(EXECUTORS)}")
    if ray_address is not None and executor != "ray":
        raise LorasumError("--ray-address applies to --executor ray; add it or drop --ray-address")
    if plan_only and verify:
        raise LorasumError("--plan and --verify are two reports; give one of them")
    if executor == "ray":  # every node reads and writes the study at the same, absolute path
        from lorasum.study.ray_executor import import_ray

        import_ray()  # installed? (one line if not), before anything is written
        out = Path(out).absolute()
    resolving = (preset, config, settings, overwrite)
    if plan_only or verify:  # read-only: no lock
        study = resolve(out, *resolving)
        plan = plan_study(study.layout)
        if verify:
            return verify_units(Ledger.load(study.layout.out), plan.tasks)
        return _describe_plan(study, plan)
    with study_lock(out, wait) as held:
        try:
            study = resolve(out, *resolving)
            prepared = _prepare(study)
            _write_study_files(study)  # the study has started: from here on it is resumable
        except BaseException:
            held.discard_created()
            raise
        return _run(study, prepared, executor, ray_address, progress, t_start)


def _describe_plan(study: Study, plan: Plan) -> dict:
    lay = study.layout
    device = pick_device(lay.base_cfg.device)
    n_train = len(plan.of_type(TrainTask))
    n_workers = study.cfg.workers or auto_workers(device, n_train)
    ledger = Ledger.load(lay.out)  # a damaged output is to run again, as a run would find

    def whole(task) -> bool:
        return ledger.status(task)[0] not in ("damaged", "missing")

    status = plan.status(whole)
    sampled = _sample(lay)
    profile = rate_profile(lay, device, _uses_bf16(lay, device))
    return {
        "plan": plan.describe(n_workers, profile, whole)
        + (f"\n{sampled['description']}" if sampled else ""),
        "units": {t.id: ("cached" if status[t] else "run") for t in plan.tasks},
    }


@dataclass
class Prepared:
    """What a run needs before its first unit: the plan, device, workers, model."""

    plan: Plan
    device: object
    workers: int
    dtype: object
    tokenizer: object
    model: object


def _prepare(study: Study) -> Prepared:
    """Plan, device and the loaded model; fails (bad model, targets) before anything is written."""
    lay = study.layout
    plan = plan_study(lay)
    device = pick_device(lay.base_cfg.device)
    n_train = len(plan.of_type(TrainTask))
    n_workers = study.cfg.workers or auto_workers(device, n_train)
    # precision auto: settled here, once, and handed to every worker (one precision per study)
    dtype = autocast_dtype(lay.base_cfg.precision, device)
    tokenizer = load_tokenizer(lay.model)
    base_model = load_model(lay.model, device)
    resolve_target_modules(base_model, lay.base_cfg.target_modules)  # fail before writing
    return Prepared(plan, device, n_workers, dtype, tokenizer, base_model)


def _run(study: Study, p: Prepared, executor: str, ray_address, progress: bool, t_start) -> dict:
    lay, device = study.layout, p.device
    bf16 = p.dtype is not None if device.type == "cpu" else None
    runner = (executor, ray_address, bf16)
    settle_cpu_bf16(bf16)
    try:
        results, timings, slots = _execute(
            p.plan, study, p.model, p.tokenizer, device, p.workers, runner, progress
        )
    finally:
        settle_cpu_bf16(None)
    wall = time.perf_counter() - t_start
    summary = aggregate(study, p.plan, results, timings, str(device), slots, wall)
    summary.manifest["hardware"].update(
        executor=executor, precision="bf16" if p.dtype is not None else "fp32"
    )
    atomic_write_text(lay.out / "results.json", summary.to_json())
    from lorasum.report.build import write_report

    write_report(summary, lay.out)
    return summary.to_dict()


def _write_study_files(study: Study) -> None:
    from lorasum.study.config import dump_yaml

    out = study.layout.out
    if study.previous is not None and study.previous.get("key") != study.key:
        # The old study's results must never sit beside the new settings, even if this run stops.
        for stale in ("results.json", "report.md", "report.html", "cosine_vs_delta.png"):
            (out / stale).unlink(missing_ok=True)
    data = {n: s.fingerprint() for n, s in study.layout.sources.items()}
    write_json(out / "config.json", {"key": study.key, **study.identity, "data": data})
    atomic_write_text(out / "experiment.yaml", dump_yaml(study.cfg))


def _uses_bf16(lay: StudyLayout, device) -> bool:
    return autocast_dtype(lay.base_cfg.precision, device) is not None


def _make_executor(runner: tuple, study: Study, model, tokenizer, device, workers):
    name, address, bf16 = runner
    if name == "ray":
        from lorasum.study.ray_executor import RayExecutor

        lay = study.layout
        return RayExecutor(lay.model, lay.out, lay.base_cfg.device, workers, address, bf16)
    return LocalExecutor(study.layout.model, model, tokenizer, device, workers, bf16)


def _execute(plan: Plan, study: Study, model, tokenizer, device, workers, executor, progress):
    """Run the plan; (results by task, seconds of the tasks run here, worker slots used)."""
    from tqdm.auto import tqdm

    # The bar counts work (≈ tokens), so its ETA follows the measured speed of what is left;
    # the postfix names the unit that finished last and counts units.
    bar = StudyProgress(
        tqdm(
            total=sum(t.cost() for t in plan.tasks),
            desc=f"study ({workers} worker{'s' if workers > 1 else ''})",
            unit="work",
            disable=not progress,
            bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}{postfix}]",
        ),
        len(plan.tasks),
    )
    ran: dict = {}  # task -> seconds
    try:
        runner = _make_executor(executor, study, model, tokenizer, device, workers)
        ledger = Ledger.load(study.layout.out)
        on_run = lambda t, s: ran.__setitem__(t, s)  # noqa: E731
        results = execute(plan.tasks, runner, bar, on_run=on_run, verifier=ledger)
    finally:
        bar.close()
    profile = rate_profile(study.layout, device, _uses_bf16(study.layout, device))
    record_rates([(t.kind, t.cost(), s) for t, s in ran.items()], profile)
    return results, ran, getattr(runner, "slots", workers)


def aggregate(
    study: Study, plan: Plan, results: dict, ran: dict, device: str, workers: int, wall: float
) -> Results:
    """results.json, typed (`lorasum.results_schema`), from the finished tasks (``results``:
    task → its result), found by the tasks themselves. The pure functions of `study.results`,
    `study.budget` and `study.accuracy` make the JSON objects of its parts."""
    lay, cfg = study.layout, study.cfg
    domains, combos, seeds = lay.names, lay.combos, lay.seeds
    runs = plan.trainings
    # each evaluation's result by seed and name (`study.names` builds the names it is read by)
    evals = {(t.seed, t.name): results[t] for t in plan.of_type(ScoredTask)}
    base_eval = evals[(None, names.BASE)]
    seed_evals = [{n: r for (s, n), r in evals.items() if s == seed} for seed in seeds]
    predictors = _predictors(plan, results, domains, combos, seed_evals, base_eval)
    methods = ["sum", *lay.methods]
    pairs, per_seed = _per_seed(lay, plan, seed_evals, base_eval, predictors, methods)
    rows = [
        aggregate_combination(combo, [r[i] for r in per_seed], seeds)
        for i, combo in enumerate(combos)
    ]
    points = [(row["rms_cosine"], row["delta_pct"]) for r in per_seed for row in r]
    metrics = _training_metrics(plan, results, seeds)
    first = runs[seeds[0]]
    base = {"per_domain": {d: base_eval["per_dataset"][d]["perplexity"] for d in domains}}
    accuracy = _accuracy(lay, rows, seed_evals, evals, methods) if lay.accuracy else None
    if accuracy:
        base["accuracy"] = accuracy["base"]
    return Results(
        lorasum_version=__version__,
        preset=cfg.preset,
        model=lay.model,
        domains=lay.domain_sources,
        seeds=seeds,
        seed_per_domain=lay.seed_per_domain,
        max_order=cfg.max_order,
        sample=_sample(lay),
        config=cfg.to_dict(),
        train_config={k: v for k, v in asdict(lay.base_cfg).items() if k not in ("data", "seed")},
        budget=_budget(plan, results),
        data={n: s.fingerprint() for n, s in lay.sources.items()},
        base=Base.from_dict(base),
        singles=_singles(domains, seeds, seed_evals, metrics),
        merged_training={
            t.name: [metrics[s][t.name] for s in seeds] for t in first.tasks if not t.single
        },
        pairs=[Pair.from_dict({"seed": s, **p}) for s in seeds for p in pairs[s]],
        combinations=[Combination.from_dict(r) for r in rows],
        cross_domain=cross_domain(domains, seed_evals, base_eval) if cfg.cross_domain else None,
        # every (combination, seed) is a point; with one seed that is one point per combination
        correlation=Correlation.from_dict(
            correlation([x for x, _ in points], [y for _, y in points])
        ),
        correlation_of_means=Correlation.from_dict(
            correlation([r["rms_cosine"] for r in rows], [r["delta_pct"] for r in rows])
        ),
        statistics=statistics(rows),
        prediction=loo_prediction(rows),
        # the same predictors against the sum vs each domain's own adapter (Δ%'s first factor)
        prediction_vs_singles=loo_prediction(rows, "delta_vs_singles_pct"),
        paper_comparison=paper_comparison(rows, lay.model, study.identity["train"]),
        train_curves=train_curves(
            lay.out,
            seeds,
            [first.single(n).name for n in domains] + [first.merged(c).name for c in combos],
        ),
        training_budget=_training_budget(cfg.budget, combos, first, metrics),
        snapshots=_snapshots(lay, plan, seed_evals, metrics) if lay.snapshot_epochs else None,
        wall_seconds=wall,
        accuracy=AccuracySummary.from_dict(accuracy["summary"]) if accuracy else None,
        prediction_vs_accuracy=accuracy["prediction"] if accuracy else None,
        manifest=manifest(seeds, lay.sources, device, workers, _timings(plan, results, ran), wall),
    )


def _training_metrics(plan: Plan, results: dict, seeds) -> dict:
    """Per seed, each training's metrics (lorasum.json's) by its name, with the seed it ran."""
    return {
        seed: {
            t.name: {"seed": results[t]["config"]["seed"], **results[t]["metrics"]}
            for t in plan.of_type(TrainTask)
            if t.seed == seed
        }
        for seed in seeds
    }


def _training_budget(budget: str, combos, first, metrics: dict) -> TrainingBudget:
    """The budget each side trained under, per combination (`study.budget.budget_summary`)."""
    singles = {c: [t.name for t in first.singles_of(c)] for c in combos}
    return TrainingBudget.from_dict(
        budget_summary(budget, BUDGETS[budget], combos, singles, metrics)
    )


def _per_seed(
    lay: StudyLayout, plan: Plan, seed_evals: list[dict], base_eval: dict, predictors, methods
) -> tuple[dict, list[list[dict]]]:
    """Per seed: its single adapters compared pairwise (`similarity_matrix`) and its rows, one
    per combination (`seed_rows`)."""
    domains, runs = lay.names, plan.trainings
    pairs = {
        s: similarity_matrix({n: read_adapter(runs[s].single(n).path).modules for n in domains})
        for s in lay.seeds
    }
    per_seed = [
        seed_rows(domains, lay.combos, pairs[s], ev, base_eval, methods, predictors[s], lay.routes)
        for s, ev in zip(lay.seeds, seed_evals, strict=True)
    ]
    return pairs, per_seed


def per_seed_accuracy(
    lay: StudyLayout, seed_evals: list[dict], base_acc: dict, methods: list[str]
) -> list:
    """Per combination, per seed: `study.accuracy.seed_accuracy` (each seed's evaluations
    with the base model's beside them)."""
    base = {names.accuracy_name(names.BASE): base_acc}
    return [
        [seed_accuracy(combo, {**ev, **base}, methods) for ev in seed_evals] for combo in lay.combos
    ]


def _accuracy(
    lay: StudyLayout, rows: list[dict], seed_evals: list[dict], evals: dict, methods: list[str]
) -> dict:
    """Accuracy for results.json: each combination's and method's, put into ``rows``
    (`add_accuracy`); returns the study-wide comparison with perplexity (``summary``), the
    predictors' leave-one-out fit of the sum's Δ accuracy (``prediction``) and the base
    model's accuracy per domain (``base``)."""
    from lorasum.accuracy import DEFAULT_MAX_NEW_TOKENS

    base = evals[(None, names.accuracy_name(names.BASE))]
    per_combo = per_seed_accuracy(lay, seed_evals, base, methods)
    for row, per_seed in zip(rows, per_combo, strict=True):
        add_accuracy(row, per_seed)
    return {
        "summary": study_accuracy(rows, base, DEFAULT_MAX_NEW_TOKENS),
        "prediction": loo_prediction(rows, "delta_acc_pts"),
        "base": {d: base["per_dataset"][d] for d in lay.domain_sources},
    }


def _sample(lay: StudyLayout) -> dict | None:
    return sample_summary(lay.combos, lay.every_combo, lay.sample, lay.sample_seed)


def _predictors(plan: Plan, results: dict, domains, combos, seed_evals, base_eval) -> dict:
    """Per seed, per combination: the activation-space predictors of this seed's adapters, the
    adapter-free ones of the data (seed-independent) and the cross-domain transfer of this
    seed's single adapters (with --cross-domain)."""
    from lorasum.analysis import predictors

    planned = plan.of_type(PredictorsTask, DataPredictorsTask)
    data = next((results[t] for t in planned if isinstance(t, DataPredictorsTask)), None) or {}
    activation = {t.seed: results[t] or {} for t in planned if isinstance(t, PredictorsTask)}
    out = {}
    for seed, evals in zip(plan.trainings, seed_evals, strict=True):
        per = {c: {**data.get(c, {}), **v} for c, v in activation.get(seed, {}).items()}
        singles = {n: evals.get(names.single_eval_name(n)) for n in domains}
        if planned and all(
            ev is not None and set(domains) <= set(ev["per_dataset"]) for ev in singles.values()
        ):
            table = {
                n: {d: ev["per_dataset"][d]["perplexity"] for d in domains}
                for n, ev in singles.items()
            }
            table["base"] = {d: base_eval["per_dataset"][d]["perplexity"] for d in domains}
            inputs = predictors.PredictorInputs(cross_domain=table)
            cross = predictors.compute(predictors.families(needing="cross_domain"), inputs, combos)
            for c, values in cross.items():
                per.setdefault(c, {}).update(values)
        out[seed] = per
    return out


def _snapshots(lay: StudyLayout, plan: Plan, seed_evals: list[dict], metrics: dict) -> Snapshots:
    """Δ% along the runs: each snapshot's step per training, from the trainings themselves."""
    epochs = lay.snapshot_epochs
    seed_steps = {}
    for seed in lay.seeds:
        steps = {}
        for t in plan.trainings[seed].tasks:
            rows = lay.train_rows(t.domains)
            steps[t.name] = {e: step_at(lay.base_cfg, rows, e) for e in epochs[:-1]}
            steps[t.name][epochs[-1]] = metrics[seed][t.name]["steps"]
        seed_steps[seed] = steps
    methods = snapshot_methods(lay)
    evals = dict(zip(lay.seeds, seed_evals, strict=True))
    return Snapshots.from_dict(
        {
            "epochs": list(epochs),
            "methods": methods,
            "combinations": snapshot_summary(lay.combos, epochs, evals, seed_steps, methods),
        }
    )


def _budget(plan: Plan, results: dict) -> dict:
    return {
        "token_policy": "equal tokens per domain: every adapter sees each of its domains' "
        "training rows once per epoch, so a merged-data adapter trains on exactly the rows "
        "of its domains' single adapters",
        "methods": "zero gradient steps; calibration methods read each domain's training "
        "inputs once (no labels); the calibrated family fits a few coefficients on the "
        "validation split within a share of the merged-data training's tokens (below)",
        "calibrated": [  # every fitted method's compositions (calibrated, learned, merge_aware)
            {"combination": names.combo_name(t.combo), "seed": t.seed, **results[t]}
            for t in plan.of_type(FittedTask)
        ],
    }


def _singles(domains, seeds, seed_evals, metrics) -> dict[str, Single]:
    """Each domain's own single adapter: perplexity on its test rows (mean over seeds) and its
    training metrics per seed."""
    out = {}
    for d in domains:
        own = [ev[names.single_eval_name(d)]["per_dataset"][d] for ev in seed_evals]
        out[d] = Single(
            perplexity=mean([p["perplexity"] for p in own]),
            tokens=own[0]["tokens"],
            train=[metrics[s][names.single_name(d)] for s in seeds],
        )
    return out


def _timings(plan: Plan, results: dict, ran: dict) -> list[dict]:
    """Seconds per task: a training's and an evaluation's own record, else the seconds the
    task took here (None for a finished task reused from an earlier run)."""
    out = []
    for t in plan.tasks:
        r = results[t]
        if isinstance(t, TrainTask):
            seconds = r["metrics"].get("seconds")
        elif isinstance(t, ScoredTask):
            if "timing" not in r:
                continue
            seconds = r["timing"]["seconds"]
        elif isinstance(t, FittedTask):
            seconds = r.get("seconds")
        else:  # a reused composition or calibration: the probe's 0.0
            seconds = ran.get(t, r if isinstance(r, float) else None)
        kind = "compose" if isinstance(t, FittedTask) else t.kind
        out.append({"unit": t.name, "seed": t.seed, "kind": kind, "seconds": seconds})
    return out
