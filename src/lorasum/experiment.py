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
from lorasum.compose import compose
from lorasum.data import Source, load_split, make_batches, tokenize_split
from lorasum.errors import LorasumError
from lorasum.evaluate import evaluate_batches, perplexity_from
from lorasum.io import config_key, existing_key, read_json, write_json
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
from lorasum.train import TrainConfig, adapter_key, train

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


def parse_domains(domains: str | list[str]) -> dict[str, str]:
    """'math,medicine' or 'fin=hf:org/ds,mine=my.jsonl' → {name: source}."""
    items = domains.split(",") if isinstance(domains, str) else list(domains)
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


def combinations(names: list[str]) -> list[tuple[str, ...]]:
    return [c for k in range(2, len(names) + 1) for c in itertools.combinations(names, k)]


def _combo_name(combo: tuple[str, ...]) -> str:
    return "+".join(combo)


def _combined(per_dataset: dict, names: tuple[str, ...]) -> dict:
    """Token-weighted perplexity of a union of test sets from per-dataset sums."""
    nll = sum(per_dataset[n]["nll"] for n in names)
    tokens = sum(per_dataset[n]["tokens"] for n in names)
    return {"perplexity": perplexity_from(nll, tokens), "nll": nll, "tokens": tokens}


class _Evaluator:
    """Evaluates the base model, alone or with an adapter, on domains' test splits; cached."""

    def __init__(
        self,
        model,
        tokenizer,
        sources: dict[str, Source],
        cfg: TrainConfig,
        out: Path,
        progress: bool,
    ):
        self.model, self.tokenizer, self.sources = model, tokenizer, sources
        self.cfg, self.out, self.progress = cfg, out, progress
        self.device = pick_device(cfg.device)
        self.amp = autocast_dtype(cfg.precision, self.device)

    def __call__(
        self, unit: str, adapter_dir: Path | None, unit_key: str, domains: tuple[str, ...]
    ) -> dict:
        srcs = [self.sources[d] for d in domains]
        key = config_key(
            {
                "unit": unit_key,
                "domains": list(domains),
                "data": [s.fingerprint()["test"] for s in srcs],
                "max_length": self.cfg.max_length,
                "answer_only": self.cfg.answer_only,
                "precision": self.cfg.precision,
                "version": __version__,
            }
        )
        path = self.out / "evals" / f"{unit}.json"
        cached = _read_json_or_none(path)
        if cached is not None and cached.get("key") == key:
            return cached["result"]
        items = tokenize_split(
            self.tokenizer, srcs, "test", self.cfg.max_length, self.cfg.answer_only
        )
        batches = make_batches(
            items, self.cfg.batch_size * 2, self.tokenizer.pad_token_id, shuffle=False
        )
        model = self.model
        if adapter_dir is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(self.model, str(adapter_dir))
        try:
            result = evaluate_batches(
                model,
                batches,
                list(domains),
                self.device,
                self.amp,
                progress=self.progress,
                desc=f"eval {unit}",
            )
        finally:
            if adapter_dir is not None:
                model.unload()
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

    evaluate = _Evaluator(base_model, tokenizer, sources, base_cfg, out, progress)
    base_eval = evaluate("base", None, f"base:{model}", tuple(names))
    per_seed = [
        _run_seed(
            seed,
            out / f"seed-{seed}",
            base_cfg,
            domain_sources,
            sources,
            base_model,
            tokenizer,
            base_eval,
            overwrite,
            seed_per_domain,
            progress,
        )
        for seed in seeds
    ]
    rows = [
        _aggregate_combination(combo, [r["rows"][i] for r in per_seed], seeds)
        for i, combo in enumerate(combinations(names))
    ]
    points = [(row["rms_cosine"], row["delta_pct"]) for r in per_seed for row in r["rows"]]
    results = {
        "lorasum_version": __version__,
        "preset": preset,
        "model": model,
        "domains": domain_sources,
        "seeds": seeds,
        "seed_per_domain": seed_per_domain,
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


def _run_seed(
    seed: int,
    out: Path,
    base_cfg: TrainConfig,
    domain_sources: dict[str, str],
    sources: dict[str, Source],
    base_model,
    tokenizer,
    base_eval: dict,
    overwrite: bool,
    seed_per_domain: bool,
    progress: bool,
) -> dict:
    """One seed of the grid: adapters, merged-data adapters, sums, similarity, perplexities."""
    from lorasum.adapters import read_adapter

    names = list(domain_sources)
    base_cfg = replace(base_cfg, seed=seed)
    # 1. one adapter per domain, 2. one merged-data adapter per combination
    adapter_dirs: dict[str, Path] = {}
    metrics: dict[str, dict] = {}
    units = [((n,), n) for n in names] + [
        (c, f"merged-{_combo_name(c)}") for c in combinations(names)
    ]
    for doms, unit in units:
        unit_seed = seed + (names.index(doms[0]) if seed_per_domain and len(doms) == 1 else 0)
        cfg = replace(base_cfg, data=[domain_sources[d] for d in doms], seed=unit_seed)
        srcs = [sources[d] for d in doms]
        path = out / "adapters" / unit
        key = adapter_key(cfg, srcs)
        # --overwrite replaces units made with other settings; identical units are still reused.
        marker = train(
            cfg,
            path,
            overwrite=overwrite and existing_key(path) != key,
            model=base_model,
            tokenizer=tokenizer,
            sources=srcs,
            progress=progress,
        )
        adapter_dirs[unit] = path
        metrics[unit] = {"seed": unit_seed, **marker["metrics"]}

    # 3. the naive sum per combination (exact, seconds)
    sum_dirs: dict[str, Path] = {}
    for combo in combinations(names):
        path = out / "sums" / _combo_name(combo)
        compose([adapter_dirs[d] for d in combo], path, overwrite=overwrite, reuse_same=True)
        sum_dirs[_combo_name(combo)] = path

    # 4. orthogonality of the domain adapters
    pairs = similarity_matrix({n: read_adapter(adapter_dirs[n]).modules for n in names})

    # 5. perplexities, cached by the adapters' actual weights
    evaluate = _Evaluator(base_model, tokenizer, sources, base_cfg, out, progress)

    def run_eval(unit: str, unit_dir: Path, domains: tuple[str, ...]) -> dict:
        return evaluate(
            unit, unit_dir, sha256_file(unit_dir / "adapter_model.safetensors"), domains
        )

    singles = {n: run_eval(f"single-{n}", adapter_dirs[n], (n,)) for n in names}
    rows = []
    for combo in combinations(names):
        cname = _combo_name(combo)
        merged = run_eval(f"merged-{cname}", adapter_dirs[f"merged-{cname}"], combo)
        summed = run_eval(f"sum-{cname}", sum_dirs[cname], combo)
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
