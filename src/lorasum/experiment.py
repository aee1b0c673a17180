"""The naive-summation study as a grid of cached units.

Per domain one adapter; per combination of ≥ 2 domains a merged-data adapter (same
hyper-parameters) and the exact naive sum of the domain adapters; perplexities on the
combination's test set (union of its domains' test splits) and per domain; Δ% of sum vs merged;
RMS cosine per combination; Pearson r and least-squares line of Δ% on RMS cosine.

Every unit (adapter, sum, evaluation) is written atomically with its key; a restarted run reuses
what finished.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import asdict, replace
from pathlib import Path

from lorasum import __version__
from lorasum.adapters import read_adapter
from lorasum.compose import compose
from lorasum.data import Source, load_split, make_batches
from lorasum.errors import LorasumError
from lorasum.evaluate import evaluate_batches
from lorasum.io import (
    atomic_write_text,
    check_output_dir,
    config_key,
    existing_key,
    read_json,
    write_json,
)
from lorasum.methods import get_method
from lorasum.models import (
    autocast_dtype,
    load_model,
    load_tokenizer,
    pick_device,
    resolve_target_modules,
    sha256_file,
)
from lorasum.similarity import similarity_matrix
from lorasum.stats import correlation
from lorasum.study_config import STUDY_ONLY_METHODS
from lorasum.study_results import (
    aggregate_combination,
    cross_domain,
    loo_prediction,
    manifest,
    mean,
    paper_comparison,
    seed_rows,
    statistics,
    train_curves,
)
from lorasum.tokens import tokenize_cached
from lorasum.train import TrainConfig, adapter_key, train
from lorasum.workers import Job, UnitRunner, auto_workers

log = logging.getLogger(__name__)

DEFAULT_DOMAINS = ("math", "medicine", "finance")
# Evaluation batches are length-sorted, so a larger batch adds little padding.
EVAL_BATCH_SIZE = 32


def parse_domains(domains: str | list[str] | dict[str, str]) -> dict[str, str]:
    """'math,medicine', 'all' (every builtin domain), 'fin=hf:org/ds,mine=my.jsonl' or
    {name: source} → {name: source}."""
    from lorasum.data import ALL_DOMAINS

    if isinstance(domains, dict):
        domains = [f"{k}={v}" for k, v in domains.items()]
    if not isinstance(domains, str | list | tuple):
        raise LorasumError("domains: give a list of names, 'all', or {name: source}")
    items = domains.split(",") if isinstance(domains, str) else [str(d) for d in domains]
    items = [d for item in items for d in (ALL_DOMAINS if item.strip() == "all" else [item])]
    out: dict[str, str] = {}
    for item in (i.strip() for i in items):
        if not item:
            continue
        name, sep, source = item.partition("=")
        name, source = (name.strip(), source.strip()) if sep else (item, item)
        if not name or not source or "+" in name or "/" in name:
            raise LorasumError(
                f"--domains entry {item!r}: use NAME or NAME=SOURCE (no '+' or '/' in NAME)"
            )
        if name in out:
            raise LorasumError(f"--domains names {name!r} twice; give each domain once")
        out[name] = source
    if len(out) < 2:
        raise LorasumError("--domains needs at least two domains to compose")
    if len(set(out.values())) != len(out):
        raise LorasumError("--domains uses one data source for two domains; give each its own")
    return out


def _read_json_or_none(path: Path) -> dict | None:
    """A cache file, or None when it is missing or unreadable (then it is recomputed)."""
    try:
        obj = read_json(path)
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def combinations(names: list[str], max_order: int | None = None) -> list[tuple[str, ...]]:
    """Every combination of 2 … max_order domains (default: up to all of them)."""
    top = len(names) if max_order is None else min(max_order, len(names))
    return [c for k in range(2, top + 1) for c in itertools.combinations(names, k)]


def _combo_name(combo: tuple[str, ...]) -> str:
    return "+".join(combo)


def eval_key(unit_key: str, domains: tuple[str, ...], sources: dict[str, Source], cfg) -> str:
    """What determines an evaluation: the unit's weights, the test rows and how they are scored."""
    return config_key(
        {
            "unit": unit_key,
            "domains": list(domains),
            "data": [sources[d].fingerprint()["test"] for d in domains],
            "max_length": cfg.max_length,
            "answer_only": cfg.answer_only,
            "precision": cfg.precision,
            "version": __version__,
        }
    )


def cached_eval(path: Path, key: str) -> dict | None:
    cached = _read_json_or_none(path)
    return cached["result"] if cached is not None and cached.get("key") == key else None


def evaluate_unit(
    path: Path,
    key: str,
    adapter_dir: Path | None,
    srcs: list[Source],
    names: list[str],
    cfg: TrainConfig,
    *,
    model,
    tokenizer,
    progress: bool = False,
) -> dict:
    """Perplexity of the base model (with the adapter, if any) on the sources' test splits,
    written atomically to ``path`` with its key. The shared ``model`` is left unchanged."""
    device = next(model.parameters()).device
    items = tokenize_cached(tokenizer, srcs, "test", cfg.max_length, cfg.answer_only)
    batches = make_batches(items, EVAL_BATCH_SIZE, tokenizer.pad_token_id, shuffle=False)
    net = model
    if adapter_dir is not None:
        from peft import PeftModel

        net = PeftModel.from_pretrained(model, str(adapter_dir))
    try:
        result = evaluate_batches(
            net,
            batches,
            names,
            device,
            autocast_dtype(cfg.precision, device),
            progress=progress,
            desc=f"eval {path.stem}",
        )
    finally:
        if adapter_dir is not None:
            net.unload()
    write_json(path, {"key": key, "result": result})
    return result


def calibrate_unit(adapter_dir: Path, *, model, tokenizer) -> float:
    """Input statistics of a domain adapter on its own training data (cached beside it)."""
    from lorasum.calibration import calibrate

    t0 = time.perf_counter()
    calibrate(adapter_dir, model=model, tokenizer=tokenizer, device=str(model.device))
    return time.perf_counter() - t0


def compose_unit(
    paths: list[Path], out: Path, method: str, options: dict, overwrite: bool, *, model, tokenizer
) -> float:
    """One composition of the study (a worker job); its seconds."""
    from lorasum.methods import MergeConfig

    t0 = time.perf_counter()
    compose(
        paths,
        out,
        overwrite=overwrite,
        reuse_same=True,
        config=MergeConfig(method=method, **options),
    )
    return time.perf_counter() - t0


def calibrated_unit(
    paths: list[Path],
    out: Path,
    val_sources: list[Source],
    training_tokens: int,
    fraction: float,
    max_length: int,
    overwrite: bool,
    *,
    model,
    tokenizer,
) -> dict:
    """The `calibrated` family on one combination (a worker job): one coefficient per adapter
    and module type, fitted on the combination's validation rows within ``fraction`` of the
    merged-data training's tokens (`lorasum.methods.calibrated`). Returns the budget report."""
    from lorasum.adapters import write_adapter
    from lorasum.compose import adapter_fingerprint
    from lorasum.factors import pad_rank
    from lorasum.io import atomic_dir
    from lorasum.methods.calibrated import fit_calibrated

    adapters = [read_adapter(p, strict=True) for p in paths]
    key = config_key(
        {
            "method": "calibrated",
            "sources": [adapter_fingerprint(a) for a in adapters],
            "val": [s.fingerprint()["val"] for s in val_sources],
            "training_tokens": training_tokens,
            "fraction": fraction,
            "max_length": max_length,
            "version": __version__,
        }
    )
    if check_output_dir(out, key, overwrite and existing_key(out) != key):
        return read_json(out / "lorasum.json")["budget"]
    t0 = time.perf_counter()
    fit, report = fit_calibrated(
        model,
        tokenizer,
        [a.modules for a in adapters],
        val_sources,
        training_tokens,
        fraction=fraction,
        max_length=max_length,
    )
    rank = max(f.rank for f in fit.modules.values())
    modules = {m: pad_rank(f, rank) for m, f in fit.modules.items()}
    report = {
        **report,
        "granularity": fit.granularity,
        "coefficient_values": fit.coefficients,  # group -> one coefficient per adapter
        "seconds": time.perf_counter() - t0,
    }
    marker = {
        "kind": "composed",
        "key": key,
        "lorasum_version": __version__,
        "method": "calibrated",
        "sources": [str(p) for p in paths],
        "base_model": adapters[0].base_model,
        "budget": report,
    }
    with atomic_dir(out, marker=marker) as tmp:
        write_adapter(
            tmp,
            modules,
            adapters[0].base_model,
            fan_in_fan_out=any(a.config.get("fan_in_fan_out") for a in adapters),
        )
    return report


def predictors_unit(
    adapters: Path, names: list[str], combos, *, model, tokenizer
) -> dict[str, dict]:
    """Activation-space predictors of every combination, from the cached input statistics
    (a worker job)."""
    from lorasum.calibration import calibrate
    from lorasum.predict import combination_predictors, interference_predictors

    factors = {n: read_adapter(adapters / n).modules for n in names}
    grams = {
        n: calibrate(adapters / n, model=model, tokenizer=tokenizer, device=str(model.device))
        for n in names
    }
    result = interference_predictors(factors, grams)
    out = {}
    for combo in combos:
        values = combination_predictors(result, combo)
        out[_combo_name(combo)] = {k: v for k, v in values.items() if k != "rms_cosine"}
    return out


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


def _job_cost(kind: str, rows: int, cfg: TrainConfig) -> float:
    """Relative cost of a unit for the progress bar's ETA: ~3 passes per training row
    (forward, backward), one per evaluated row; ~token-proportional."""
    return rows * cfg.max_length * (3.0 if kind == "train" else 1.0) / 1000.0


def reproduce(
    out: str | Path,
    preset: str | None = "quick",
    model: str | None = None,
    domains: str | list[str] | dict[str, str] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    seed_per_domain: bool | None = None,
    seeds: list[int] | None = None,
    workers: int | None = None,
    max_order: int | None = None,
    config: str | Path | None = None,
    methods: str | list[str] | dict | None = None,
    **overrides,
) -> dict:
    """`lorasum reproduce`: run the study; write results.json, report.md/html and plots.

    Settings: the ``preset`` (a YAML file shipped in the package), then the experiment file
    ``config``, then the arguments (None = not given); see `lorasum.study_config`.
    """
    from lorasum.report import write_report
    from lorasum.study_config import dump_yaml, resolve_study

    t_start = time.perf_counter()
    study_cfg = resolve_study(
        preset,
        config,
        {
            "model": model,
            "domains": domains,
            "seed_per_domain": seed_per_domain,
            "seeds": seeds,
            "workers": workers,
            "max_order": max_order,
            "methods": methods,
            **overrides,
        },
    )
    domain_sources = study_cfg.domains
    names = list(domain_sources)
    model = study_cfg.model
    seeds = study_cfg.seeds
    seed_per_domain = study_cfg.seed_per_domain
    max_order = study_cfg.max_order
    train_settings = {**study_cfg.train, "eval_val": False}
    if "seed" not in train_settings:
        train_settings["seed"] = seeds[0]
    base_cfg = TrainConfig(model=model, data=["-"], **train_settings)
    out = Path(out)
    # What the trained units depend on; methods and extra rows are units of their own, so a
    # rerun with more methods reuses the study directory.
    study = {
        "preset": study_cfg.preset,
        "model": model,
        "domains": domain_sources,
        "train": {k: v for k, v in base_cfg.identity().items() if k != "seed"},
        "seeds": seeds,
        "seed_per_domain": seed_per_domain,
        "version": __version__,
    }
    if max_order is not None:  # absent = all orders, so older study directories keep their key
        study["max_order"] = max_order
    study_key = config_key(study)
    cfg_path = out / "config.json"
    if out.exists() and not out.is_dir():
        raise LorasumError(f"output path {out} is a file; choose another --out")
    previous = _read_json_or_none(cfg_path) if cfg_path.is_file() else None
    if previous is not None:
        if previous.get("key") != study_key and not overwrite:
            raise LorasumError(
                f"{out} holds a study with different settings; choose a new --out or pass --overwrite"
            )
    elif out.is_dir() and any(out.iterdir()):
        # --overwrite never deletes or mixes into a directory that is not a lorasum study.
        raise LorasumError(
            f"output directory {out} is not empty and holds no lorasum study; choose a new --out"
        )

    # Load everything that can fail on user input before any work is written.
    sources = {
        n: load_split(
            src,
            base_cfg.split_seed,
            base_cfg.question_field,
            base_cfg.answer_field,
            base_cfg.max_train,
            base_cfg.max_eval,
        )
        for n, src in domain_sources.items()
    }
    for n, s in sources.items():
        s.name = n
        for split in ("train", "test"):
            if not s.splits[split]:
                raise LorasumError(f"domain {n}: the {split} split is empty; use more data")
    tokenizer = load_tokenizer(model)
    device = pick_device(base_cfg.device)
    base_model = load_model(model, device)
    resolve_target_modules(base_model, base_cfg.target_modules)  # fail before writing anything
    if previous is not None and previous.get("key") != study_key:
        # The old study's results must never sit beside the new settings, even if this run stops.
        for stale in ("results.json", "report.md", "report.html", "cosine_vs_delta.png"):
            (out / stale).unlink(missing_ok=True)
    write_json(
        cfg_path,
        {"key": study_key, **study, "data": {n: s.fingerprint() for n, s in sources.items()}},
    )
    atomic_write_text(out / "experiment.yaml", dump_yaml(study_cfg))

    combos = combinations(names, max_order)
    methods_run = [m for m in study_cfg.methods if m != "sum"]
    calibration_methods = [
        m for m in methods_run if m not in STUDY_ONLY_METHODS and get_method(m).calibration
    ]
    variants = (
        [
            (combo, tuple(d for d in combo if d != third), third)
            for combo in combos
            if len(combo) == 3
            for third in combo
        ]
        if study_cfg.paper_variants
        else []
    )
    if variants and max_order is not None and max_order < 3:
        variants = []
    train_plan = [
        (seed, unit, cfg, srcs, out / f"seed-{seed}" / "adapters" / unit)
        for seed in seeds
        for unit, cfg, srcs in _training_units(
            replace(base_cfg, seed=seed), domain_sources, sources, names, combos, seed_per_domain
        )
    ]
    test_rows = {n: len(s.splits["test"]) for n, s in sources.items()}
    single_domains = {n: tuple(names) if study_cfg.cross_domain else (n,) for n in names}
    eval_rows = (
        sum(test_rows.values())
        + len(seeds) * sum(sum(test_rows[d] for d in single_domains[n]) for n in names)
        + len(seeds) * sum((2 + len(methods_run)) * sum(test_rows[d] for d in c) for c in combos)
        + len(seeds) * sum(sum(test_rows[d] for d in c) for c, _, _ in variants)
    )
    train_rows = sum(sum(len(s.splits["train"]) for s in u[3]) for u in train_plan)
    calibrating = study_cfg.predictors or bool(calibration_methods)
    n_composes = len(seeds) * len(methods_run) * len(combos)  # in workers (sums: in the study)
    n_predictor_jobs = len(seeds) if study_cfg.predictors else 0
    n_units = (
        len(train_plan)
        + 1
        + len(seeds) * (len(names) + (2 + len(methods_run)) * len(combos) + len(variants))
        + (len(seeds) * len(names) if calibrating else 0)
        + n_composes
        + n_predictor_jobs
    )
    calib_cost = {
        n: _job_cost("eval", len(s.splits["train"]), base_cfg) for n, s in sources.items()
    }
    compose_cost = _job_cost("eval", 8, base_cfg)  # a few seconds; calibration methods more
    extra_cost = (n_composes + n_predictor_jobs) * compose_cost + (
        len(seeds) * sum(calib_cost.values()) if calibrating else 0.0
    )
    workers = study_cfg.workers or auto_workers(device, len(train_plan))
    from tqdm.auto import tqdm

    # The bar counts work (≈ tokens), so its ETA follows the measured speed of what is left;
    # the postfix names the unit that finished last and counts units.
    bar = StudyProgress(
        tqdm(
            total=_job_cost("train", train_rows, base_cfg)
            + _job_cost("eval", eval_rows, base_cfg)
            + extra_cost,
            desc=f"study ({workers} worker{'s' if workers > 1 else ''})",
            unit="work",
            disable=not progress,
            bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}{postfix}]",
        ),
        n_units,
    )
    inner_progress = progress and workers == 1
    timings: list[dict] = []

    def eval_cost(domains) -> float:
        return _job_cost("eval", sum(test_rows[d] for d in domains), base_cfg)

    with UnitRunner(model, base_model, tokenizer, device, workers) as runner:
        evals: dict[tuple[int | None, str], dict] = {}

        def eval_job(seed, unit, unit_dir, unit_key, domains) -> Job | None:
            """The evaluation's job, or None when a finished result is cached (then stored)."""
            if unit_key is None:
                unit_key = sha256_file(unit_dir / "adapter_model.safetensors")
            path = (out if seed is None else out / f"seed-{seed}") / "evals" / f"{unit}.json"
            key = eval_key(unit_key, domains, sources, base_cfg)
            cached = cached_eval(path, key)
            if cached is not None:
                evals[(seed, unit)] = cached
                bar.update(eval_cost(domains))
                return None
            srcs = [sources[x] for x in domains]
            args = (path, key, unit_dir, srcs, list(domains), base_cfg)
            return Job(
                f"eval {unit}",
                evaluate_unit,
                args,
                dict(progress=inner_progress),
                cost=eval_cost(domains),
            )

        # 1. one adapter per domain, one merged-data adapter per combination (every seed),
        #    longest first so the workers finish together; the base model's evaluation too.
        markers: dict[tuple[int, str], dict] = {}
        jobs, job_keys = [], []
        for seed, unit, cfg, srcs, path in sorted(
            train_plan, key=lambda u: -sum(len(s.splits["train"]) for s in u[3])
        ):
            key = adapter_key(cfg, srcs)
            cost = _job_cost("train", sum(len(s.splits["train"]) for s in srcs), base_cfg)
            # --overwrite replaces units made with other settings; identical ones are reused.
            unit_overwrite = overwrite and existing_key(path) != key
            if check_output_dir(path, key, unit_overwrite):
                markers[(seed, unit)] = read_json(path / "lorasum.json")
                bar.update(cost)
                continue
            jobs.append(
                Job(
                    f"train {unit} seed {seed}",
                    train,
                    (cfg, path),
                    dict(overwrite=unit_overwrite, sources=srcs, progress=inner_progress),
                    cost=cost,
                )
            )
            job_keys.append(("train", seed, unit))
        base_job = eval_job(None, "base", None, f"base:{model}", tuple(names))
        if base_job is not None:
            jobs.append(base_job)
            job_keys.append(("eval", None, "base"))
        for (kind, seed, unit), result in zip(job_keys, runner.run(jobs, bar), strict=True):
            (markers if kind == "train" else evals)[(seed, unit)] = result

        # 2. the naive sums and the paper's triple variants (merged-data adapter of a pair +
        #    the third domain's adapter): exact, a second each; 3. orthogonality of the domains
        pairs: dict[int, list[dict]] = {}
        variant_specs = []  # (seed, unit, dir, combo)
        for seed in seeds:
            d = out / f"seed-{seed}"
            adapters = d / "adapters"
            sums = [
                ([adapters / x for x in c], d / "sums" / _combo_name(c), f"sum-{_combo_name(c)}")
                for c in combos
            ]
            for combo, pair, third in variants:
                unit = f"variant-{_combo_name(pair)}+{third}"
                paths = [adapters / f"merged-{_combo_name(pair)}", adapters / third]
                sums.append((paths, d / "variants" / unit.removeprefix("variant-"), unit))
                variant_specs.append(
                    (seed, unit, d / "variants" / unit.removeprefix("variant-"), combo)
                )
            for paths, path, unit in sums:
                t0 = time.perf_counter()
                compose(paths, path, overwrite=overwrite, reuse_same=True)
                timings.append(_timing(unit, seed, "compose", t0))
            pairs[seed] = similarity_matrix({n: read_adapter(adapters / n).modules for n in names})

        def eval_jobs_for(specs) -> tuple[list[Job], list[tuple]]:
            """Jobs for the evaluations that are not cached (largest test sets first), and the
            (seed, unit) each fills."""
            jobs, job_keys = [], []
            for spec in sorted(specs, key=lambda spec: -sum(test_rows[x] for x in spec[4])):
                job = eval_job(*spec)
                if job is not None:
                    jobs.append(job)
                    job_keys.append(spec[:2])
            return jobs, job_keys

        # 4. perplexities of everything composed so far, cached by the units' actual weights,
        #    in the same pool as the input statistics of the domain adapters (calibration;
        #    for the predictors and the data-aware methods), which go first
        specs = []
        for seed in seeds:
            d = out / f"seed-{seed}"
            specs += [
                (seed, f"single-{n}", d / "adapters" / n, None, single_domains[n]) for n in names
            ]
            for combo in combos:
                c = _combo_name(combo)
                specs.append((seed, f"merged-{c}", d / "adapters" / f"merged-{c}", None, combo))
                specs.append((seed, f"sum-{c}", d / "sums" / c, None, combo))
            specs += [(s, u, path, None, c) for s, u, path, c in variant_specs if s == seed]
        singles = [(s, n, out / f"seed-{s}" / "adapters" / n) for s in seeds for n in names]
        calib_jobs = (
            [
                Job(f"calibrate {n} seed {s}", calibrate_unit, (p,), cost=calib_cost[n])
                for s, n, p in singles
            ]
            if calibrating
            else []
        )
        eval_jobs, eval_keys = eval_jobs_for(specs)
        done = runner.run(calib_jobs + eval_jobs, bar)
        for (s, n, _), seconds in zip(singles, done[: len(calib_jobs)], strict=False):
            timings.append(
                {"unit": f"calibrate-{n}", "seed": s, "kind": "calibrate", "seconds": seconds}
            )
        evals.update(zip(eval_keys, done[len(calib_jobs) :], strict=True))

        # 5. the predictors of every combination (from the cached statistics), beside every
        #    other method composed on every combination
        compose_specs = []
        for seed in seeds:
            d = out / f"seed-{seed}"
            for m in methods_run:
                for combo in combos:
                    c = _combo_name(combo)
                    paths = [d / "adapters" / x for x in combo]
                    opts = study_cfg.methods[m]
                    compose_specs.append(
                        (seed, f"method-{m}-{c}", paths, d / "methods" / m / c, m, opts, combo)
                    )
        predictor_seeds = seeds if study_cfg.predictors else []
        jobs = [
            Job(
                f"predictors seed {seed}",
                predictors_unit,
                (out / f"seed-{seed}" / "adapters", names, combos),
                cost=compose_cost,
            )
            for seed in predictor_seeds
        ]

        def compose_job(seed, unit, paths, path, m, opts, combo) -> Job:
            if m != "calibrated":
                args = (paths, path, m, opts, overwrite)
                return Job(f"compose {unit} seed {seed}", compose_unit, args, cost=compose_cost)
            merged = markers[(seed, f"merged-{_combo_name(combo)}")]["metrics"]
            args = (
                paths,
                path,
                [sources[x] for x in combo],
                int(merged["real_tokens"]),
                opts["fraction"],
                base_cfg.max_length,
                overwrite,
            )
            return Job(f"fit {unit} seed {seed}", calibrated_unit, args, cost=compose_cost)

        jobs += [compose_job(*spec) for spec in compose_specs]
        done = runner.run(jobs, bar)
        predictors: dict[int, dict] = {s: {} for s in seeds}
        predictors.update(zip(predictor_seeds, done[: len(predictor_seeds)], strict=True))
        calibrated_budget = []
        for spec, result in zip(compose_specs, done[len(predictor_seeds) :], strict=True):
            if spec[4] == "calibrated":
                calibrated_budget.append(
                    {"combination": spec[1][len("method-calibrated-") :], "seed": spec[0], **result}
                )
                result = result.get("seconds")
            timings.append({"unit": spec[1], "seed": spec[0], "kind": "compose", "seconds": result})

        # 6. perplexities of the methods' compositions
        jobs, job_keys = eval_jobs_for(
            [(s, u, path, None, c) for s, u, _, path, _, _, c in compose_specs]
        )
        evals.update(zip(job_keys, runner.run(jobs, bar), strict=True))
    bar.close()

    base_eval = evals[(None, "base")]
    seed_evals = [{u: r for (s, u), r in evals.items() if s == seed} for seed in seeds]
    per_seed = [
        seed_rows(
            names, combos, pairs[seed], ev, base_eval, list(study_cfg.methods), predictors[seed]
        )
        for seed, ev in zip(seeds, seed_evals, strict=True)
    ]
    metrics = {
        seed: {
            u: {"seed": m["config"]["seed"], **m["metrics"]}
            for (s, u), m in markers.items()
            if s == seed
        }
        for seed in seeds
    }
    rows = [
        aggregate_combination(combo, [r[i] for r in per_seed], seeds)
        for i, combo in enumerate(combos)
    ]
    points = [(row["rms_cosine"], row["delta_pct"]) for r in per_seed for row in r]
    for (seed, unit), r in evals.items():
        if "timing" in r:
            timings.append(
                {"unit": unit, "seed": seed, "kind": "eval", "seconds": r["timing"]["seconds"]}
            )
    for (seed, unit), m in markers.items():
        timings.append(
            {"unit": unit, "seed": seed, "kind": "train", "seconds": m["metrics"].get("seconds")}
        )
    wall = time.perf_counter() - t_start
    results = {
        "lorasum_version": __version__,
        "preset": study_cfg.preset,
        "model": model,
        "domains": domain_sources,
        "seeds": seeds,
        "seed_per_domain": seed_per_domain,
        "max_order": max_order,
        "config": study_cfg.to_dict(),
        "train_config": {k: v for k, v in asdict(base_cfg).items() if k not in ("data", "seed")},
        "budget": {
            "token_policy": "equal tokens per domain: every adapter sees each of its domains' "
            "training rows once per epoch, so a merged-data adapter trains on exactly the rows "
            "of its domains' single adapters",
            "methods": "zero gradient steps; calibration methods read each domain's training "
            "inputs once (no labels); the calibrated family fits a few coefficients on the "
            "validation split within a share of the merged-data training's tokens (below)",
            "calibrated": calibrated_budget,
        },
        "data": {n: s.fingerprint() for n, s in sources.items()},
        "base": {"per_domain": {d: base_eval["per_dataset"][d]["perplexity"] for d in names}},
        "singles": {
            n: {
                "perplexity": mean(
                    [ev[f"single-{n}"]["per_dataset"][n]["perplexity"] for ev in seed_evals]
                ),
                "tokens": seed_evals[0][f"single-{n}"]["per_dataset"][n]["tokens"],
                "train": [metrics[s][n] for s in seeds],
            }
            for n in names
        },
        "merged_training": {
            u: [metrics[s][u] for s in seeds] for u in metrics[seeds[0]] if u.startswith("merged-")
        },
        "pairs": [{"seed": s, **p} for s in seeds for p in pairs[s]],
        "combinations": rows,
        "cross_domain": cross_domain(names, seed_evals, base_eval)
        if study_cfg.cross_domain
        else None,
        # every (combination, seed) is a point; with one seed that is one point per combination
        "correlation": correlation([x for x, _ in points], [y for _, y in points]),
        "correlation_of_means": correlation(
            [r["rms_cosine"] for r in rows], [r["delta_pct"] for r in rows]
        ),
        "statistics": statistics(rows),
        "prediction": loo_prediction(rows),
        # the same predictors against the sum vs each domain's own adapter (Δ%'s first factor)
        "prediction_vs_singles": loo_prediction(rows, "delta_vs_singles_pct"),
        "paper_comparison": paper_comparison(rows, model, study["train"]),
        "train_curves": train_curves(out, seeds, [u for _, u, _ in _unit_names(names, combos)]),
        "wall_seconds": wall,
    }
    results["manifest"] = manifest(seeds, sources, str(device), workers, timings, wall)
    write_json(out / "results.json", results)
    write_report(results, out)
    return results


def _timing(unit: str, seed: int | None, kind: str, t0: float) -> dict:
    return {"unit": unit, "seed": seed, "kind": kind, "seconds": time.perf_counter() - t0}


def _unit_names(names: list[str], combos: list[tuple[str, ...]]):
    """(domains, unit name, is_single) of every training unit of one seed."""
    return [((n,), n, True) for n in names] + [
        (c, f"merged-{_combo_name(c)}", False) for c in combos
    ]


def _training_units(
    cfg: TrainConfig,
    domain_sources: dict[str, str],
    sources: dict[str, Source],
    names: list[str],
    combos: list[tuple[str, ...]],
    seed_per_domain: bool,
) -> list[tuple[str, TrainConfig, list[Source]]]:
    """One seed's trainings: an adapter per domain, a merged-data adapter per combination."""
    units = [((n,), n) for n in names] + [(c, f"merged-{_combo_name(c)}") for c in combos]
    out = []
    for doms, unit in units:
        unit_seed = cfg.seed + (names.index(doms[0]) if seed_per_domain and len(doms) == 1 else 0)
        unit_cfg = replace(cfg, data=[domain_sources[d] for d in doms], seed=unit_seed)
        out.append((unit, unit_cfg, [sources[d] for d in doms]))
    return out
