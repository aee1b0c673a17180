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
import math
import time
from dataclasses import asdict, fields, replace
from pathlib import Path

from lorasum import __version__
from lorasum.adapters import read_adapter
from lorasum.compose import compose
from lorasum.data import Source, load_split, make_batches
from lorasum.errors import LorasumError
from lorasum.evaluate import evaluate_batches, perplexity_from
from lorasum.io import check_output_dir, config_key, existing_key, read_json, write_json
from lorasum.models import (
    autocast_dtype,
    load_model,
    load_tokenizer,
    pick_device,
    resolve_target_modules,
    sha256_file,
)
from lorasum.similarity import combination_rms, similarity_matrix
from lorasum.stats import correlation, delta_pct
from lorasum.tokens import tokenize_cached
from lorasum.train import TrainConfig, adapter_key, train
from lorasum.workers import Job, UnitRunner, auto_workers

log = logging.getLogger(__name__)

# Presets set TrainConfig fields. `paper` is the paper's setup on all the data; `quick` is sized
# to finish the 3-domain study in under 10 minutes on a 2-core CPU without bf16 (subsampled
# rows, short sequences, a higher learning rate so a few steps still move the adapters).
PRESETS: dict[str, dict] = {
    "paper": dict(
        rank=4,
        alpha=64.0,
        dropout=0.1,
        lr=5e-5,
        warmup_steps=2,
        weight_decay=0.01,
        epochs=1.0,
        batch_size=8,
        max_length=128,
    ),
    "quick": dict(
        rank=4,
        alpha=64.0,
        dropout=0.1,
        lr=2e-4,
        warmup_steps=2,
        weight_decay=0.01,
        epochs=1.0,
        batch_size=8,
        max_length=64,
        max_train=48,
        max_eval=24,
    ),
    # For tests and smoke runs on tiny models.
    "tiny": dict(
        rank=4,
        alpha=64.0,
        dropout=0.0,
        lr=1e-3,
        warmup_steps=0,
        weight_decay=0.0,
        epochs=1.0,
        batch_size=4,
        max_length=32,
        max_train=8,
        max_eval=4,
    ),
}
DEFAULT_DOMAINS = ("math", "medicine", "finance")
# Evaluation batches are length-sorted, so a larger batch adds little padding.
EVAL_BATCH_SIZE = 32


def parse_domains(domains: str | list[str]) -> dict[str, str]:
    """'math,medicine', 'all' (every builtin domain) or 'fin=hf:org/ds,mine=my.jsonl' →
    {name: source}."""
    from lorasum.data import ALL_DOMAINS

    items = domains.split(",") if isinstance(domains, str) else list(domains)
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


def _combined(per_dataset: dict, names: tuple[str, ...]) -> dict:
    """Token-weighted perplexity of a union of test sets from per-dataset sums."""
    nll = sum(per_dataset[n]["nll"] for n in names)
    tokens = sum(per_dataset[n]["tokens"] for n in names)
    return {"perplexity": perplexity_from(nll, tokens), "nll": nll, "tokens": tokens}


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


def reproduce(
    out: str | Path,
    preset: str = "quick",
    model: str = "default",
    domains: str | list[str] = DEFAULT_DOMAINS,
    overwrite: bool = False,
    progress: bool = True,
    seed_per_domain: bool = False,
    seeds: list[int] | None = None,
    workers: int | None = None,
    max_order: int | None = None,
    **overrides,
) -> dict:
    """`lorasum reproduce`: run the study; write results.json, report.md and cosine_vs_delta.png."""
    from lorasum.report import write_report

    t_start = time.perf_counter()
    if preset not in PRESETS:
        raise LorasumError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    known = {f.name for f in fields(TrainConfig)} - {"model", "data"}
    unknown = set(overrides) - known
    if unknown:
        raise LorasumError(f"unknown study settings {sorted(unknown)}; known: {sorted(known)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    domain_sources = parse_domains(domains)
    names = list(domain_sources)
    base_cfg = TrainConfig(
        model=model, data=["-"], **{**PRESETS[preset], **overrides, "eval_val": False}
    )
    if max_order is not None and max_order < 2:
        raise LorasumError(f"--max-order {max_order}: combinations have at least 2 domains")
    if workers is not None and workers < 1:
        raise LorasumError(f"--workers {workers}: use 1 or more worker processes")
    seeds = [base_cfg.seed] if not seeds else [int(x) for x in seeds]
    if len(set(seeds)) != len(seeds):
        raise LorasumError(f"--seeds repeats a seed: {seeds}; give distinct seeds")
    if seed_per_domain and len(seeds) > 1 and max(seeds) - min(seeds) < len(names):
        raise LorasumError(
            "--seed-per-domain offsets each domain's seed by its index; space --seeds at least "
            f"{len(names)} apart (e.g. 0,100,200) so runs never share an init"
        )
    out = Path(out)
    study = {
        "preset": preset,
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
        for stale in ("results.json", "report.md", "cosine_vs_delta.png"):
            (out / stale).unlink(missing_ok=True)
    write_json(
        cfg_path,
        {"key": study_key, **study, "data": {n: s.fingerprint() for n, s in sources.items()}},
    )

    combos = combinations(names, max_order)
    train_plan = [
        (seed, unit, cfg, srcs, out / f"seed-{seed}" / "adapters" / unit)
        for seed in seeds
        for unit, cfg, srcs in _training_units(
            replace(base_cfg, seed=seed), domain_sources, sources, names, combos, seed_per_domain
        )
    ]
    n_evals = 1 + len(seeds) * (len(names) + 2 * len(combos))
    workers = workers or auto_workers(device, len(train_plan))
    from tqdm.auto import tqdm

    bar = tqdm(
        total=len(train_plan) + n_evals,
        desc=f"study ({workers} worker{'s' if workers > 1 else ''})",
        unit="unit",
        disable=not progress,
    )
    inner_progress = progress and workers == 1
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
                bar.update(1)
                return None
            srcs = [sources[x] for x in domains]
            args = (path, key, unit_dir, srcs, list(domains), base_cfg)
            return Job(f"eval {unit}", evaluate_unit, args, dict(progress=inner_progress))

        # 1. one adapter per domain, one merged-data adapter per combination (every seed),
        #    longest first so the workers finish together; the base model's evaluation too.
        markers: dict[tuple[int, str], dict] = {}
        jobs, job_keys = [], []
        for seed, unit, cfg, srcs, path in sorted(
            train_plan, key=lambda u: -sum(len(s.splits["train"]) for s in u[3])
        ):
            key = adapter_key(cfg, srcs)
            # --overwrite replaces units made with other settings; identical ones are reused.
            unit_overwrite = overwrite and existing_key(path) != key
            if check_output_dir(path, key, unit_overwrite):
                markers[(seed, unit)] = read_json(path / "lorasum.json")
                bar.update(1)
                continue
            jobs.append(
                Job(
                    f"train {unit} seed {seed}",
                    train,
                    (cfg, path),
                    dict(overwrite=unit_overwrite, sources=srcs, progress=inner_progress),
                )
            )
            job_keys.append(("train", seed, unit))
        base_job = eval_job(None, "base", None, f"base:{model}", tuple(names))
        if base_job is not None:
            jobs.append(base_job)
            job_keys.append(("eval", None, "base"))
        for (kind, seed, unit), result in zip(job_keys, runner.run(jobs, bar), strict=True):
            (markers if kind == "train" else evals)[(seed, unit)] = result

        # 2. the naive sum per combination (exact, seconds), 3. orthogonality of the domains
        pairs: dict[int, list[dict]] = {}
        for seed in seeds:
            adapters = out / f"seed-{seed}" / "adapters"
            for combo in combos:
                compose(
                    [adapters / d for d in combo],
                    out / f"seed-{seed}" / "sums" / _combo_name(combo),
                    overwrite=overwrite,
                    reuse_same=True,
                )
            pairs[seed] = similarity_matrix({n: read_adapter(adapters / n).modules for n in names})

        # 4. perplexities, cached by the units' actual weights (largest test sets first)
        specs = []
        for seed in seeds:
            d = out / f"seed-{seed}"
            specs += [(seed, f"single-{n}", d / "adapters" / n, None, (n,)) for n in names]
            for combo in combos:
                c = _combo_name(combo)
                specs.append((seed, f"merged-{c}", d / "adapters" / f"merged-{c}", None, combo))
                specs.append((seed, f"sum-{c}", d / "sums" / c, None, combo))
        specs.sort(key=lambda spec: -sum(len(sources[x].splits["test"]) for x in spec[4]))
        jobs, job_keys = [], []
        for spec in specs:
            job = eval_job(*spec)
            if job is not None:
                jobs.append(job)
                job_keys.append(spec[:2])
        evals.update(zip(job_keys, runner.run(jobs, bar), strict=True))
    bar.close()

    base_eval = evals[(None, "base")]
    per_seed = [
        _seed_results(
            seed,
            names,
            combos,
            pairs[seed],
            {
                u: {"seed": m["config"]["seed"], **m["metrics"]}
                for (s, u), m in markers.items()
                if s == seed
            },
            {u: r for (s, u), r in evals.items() if s == seed},
            base_eval,
        )
        for seed in seeds
    ]
    rows = [
        _aggregate_combination(combo, [r["rows"][i] for r in per_seed], seeds)
        for i, combo in enumerate(combos)
    ]
    points = [(row["rms_cosine"], row["delta_pct"]) for r in per_seed for row in r["rows"]]
    results = {
        "lorasum_version": __version__,
        "preset": preset,
        "model": model,
        "domains": domain_sources,
        "seeds": seeds,
        "seed_per_domain": seed_per_domain,
        "max_order": max_order,
        "train_config": {k: v for k, v in asdict(base_cfg).items() if k not in ("data", "seed")},
        "data": {n: s.fingerprint() for n, s in sources.items()},
        "base": {"per_domain": {d: base_eval["per_dataset"][d]["perplexity"] for d in names}},
        "singles": {
            n: {
                "perplexity": _mean([r["singles"][n]["perplexity"] for r in per_seed]),
                "tokens": per_seed[0]["singles"][n]["tokens"],
                "train": [r["metrics"][n] for r in per_seed],
            }
            for n in names
        },
        "merged_training": {
            u: [r["metrics"][u] for r in per_seed]
            for u in per_seed[0]["metrics"]
            if u.startswith("merged-")
        },
        "pairs": [{"seed": r["seed"], **p} for r in per_seed for p in r["pairs"]],
        "combinations": rows,
        # every (combination, seed) is a point; with one seed that is one point per combination
        "correlation": correlation([x for x, _ in points], [y for _, y in points]),
        "correlation_of_means": correlation(
            [r["rms_cosine"] for r in rows], [r["delta_pct"] for r in rows]
        ),
        "wall_seconds": time.perf_counter() - t_start,
    }
    write_json(out / "results.json", results)
    write_report(results, out)
    return results


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _ci95(values: list[float]) -> list[float] | None:
    """Two-sided 95% Student-t interval of the mean; None with fewer than two values."""
    from scipy import stats

    n = len(values)
    if n < 2:
        return None
    m = _mean(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    return [m - half, m + half]


def _aggregate_combination(combo: tuple[str, ...], rows: list[dict], seeds: list[int]) -> dict:
    """Mean over seeds of one combination's numbers, with 95% intervals and the per-seed rows."""
    keys = ("ppl_sum", "ppl_merged", "ppl_base", "delta_pct", "rms_cosine")
    out: dict = {"domains": list(combo)}
    out.update({k: _mean([r[k] for r in rows]) for k in keys})
    out["ci95"] = {
        k: _ci95([r[k] for r in rows]) for k in ("delta_pct", "rms_cosine", "ppl_sum", "ppl_merged")
    }
    out["tokens"] = rows[0]["tokens"]
    out["per_domain"] = {
        d: {k: _mean([r["per_domain"][d][k] for r in rows]) for k in rows[0]["per_domain"][d]}
        for d in combo
    }
    out["per_seed"] = [
        {"seed": s, **{k: r[k] for k in keys}} for s, r in zip(seeds, rows, strict=True)
    ]
    return out


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


def _seed_results(
    seed: int,
    names: list[str],
    combos: list[tuple[str, ...]],
    pairs: list[dict],
    metrics: dict[str, dict],
    evals: dict[str, dict],
    base_eval: dict,
) -> dict:
    """One seed's rows: per combination the merged-data and summed perplexities, Δ%, RMS cos."""
    singles = {n: evals[f"single-{n}"] for n in names}
    rows = []
    for combo in combos:
        cname = _combo_name(combo)
        merged, summed = evals[f"merged-{cname}"], evals[f"sum-{cname}"]
        base_c = _combined(base_eval["per_dataset"], combo)
        rows.append(
            {
                "domains": list(combo),
                "ppl_sum": summed["perplexity"],
                "ppl_merged": merged["perplexity"],
                "ppl_base": base_c["perplexity"],
                "delta_pct": delta_pct(summed["perplexity"], merged["perplexity"]),
                "rms_cosine": combination_rms(pairs, combo),
                "tokens": summed["tokens"],
                "per_domain": {
                    d: {
                        "ppl_sum": summed["per_dataset"][d]["perplexity"],
                        "ppl_merged": merged["per_dataset"][d]["perplexity"],
                        "ppl_base": base_eval["per_dataset"][d]["perplexity"],
                        "ppl_single": singles[d]["perplexity"],
                        "delta_pct": delta_pct(
                            summed["per_dataset"][d]["perplexity"],
                            merged["per_dataset"][d]["perplexity"],
                        ),
                    }
                    for d in combo
                },
            }
        )
    return {"seed": seed, "rows": rows, "pairs": pairs, "singles": singles, "metrics": metrics}
