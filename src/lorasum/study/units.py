"""The units a study is made of: a frozen description (what, key, inputs, resources, cost) and
the functions that run them.

A unit function is ``fn(*args, model=..., tokenizer=...)``: it reads its inputs from paths,
writes its output atomically under its own path with its key, and returns a small JSON-able
result. It is a pure function of its key and its inputs, so any executor (any worker, any node)
may run it, and run it again if a worker died. ``probe`` (run in the driver, once the unit's
dependencies are finished) returns the cached result of a finished unit, or None.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorasum._version import __version__
from lorasum.adapters import read_adapter
from lorasum.data import Source, make_batches
from lorasum.io import check_output_dir, config_key, existing_key, read_json, write_json
from lorasum.models import autocast_dtype, sha256_file
from lorasum.tokens import tokenize_cached
from lorasum.train import TrainConfig

# Evaluation batches are length-sorted, so a larger batch adds little padding.
EVAL_BATCH_SIZE = 32
KINDS = ("train", "eval", "calibrate", "compose", "fit", "predictors")


@dataclass(frozen=True)
class Resources:
    """What one run of a unit needs: CPU threads (0 = the worker's share), GPUs, memory."""

    threads: int = 0
    gpus: int = 0
    memory_gb: float = 2.0


@dataclass(frozen=True, eq=False)
class Unit:
    """One cached piece of a study. ``key`` is the cache key where it is known before the
    inputs exist (trainings, the base evaluation); None where it hashes its inputs' contents
    (compositions, their evaluations), which ``probe`` computes once they exist."""

    kind: str  # one of KINDS
    seed: int | None  # None: seed-independent (the base model's evaluation)
    name: str  # e.g. "math", "merged-math+medicine", "sum-math+medicine", "method-tsv-a+b"
    label: str  # for the progress bar
    fn: Callable[..., Any]
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    deps: tuple[str, ...] = ()
    cost: float = 1.0  # relative work (≈ tokens / 1000), for the ETA and longest-first order
    resources: Resources = Resources()
    output: Path | None = None
    key: str | None = None
    probe: Callable[[], Any] | None = None  # the cached result, or None: run it

    @property
    def id(self) -> str:
        """Unique in a plan: kind, seed and name."""
        return f"{self.kind}/{self.seed}/{self.name}"

    def __hash__(self) -> int:
        return hash(self.id)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Unit) and other.id == self.id

    def cached(self) -> Any | None:
        return None if self.probe is None else self.probe()


def job_cost(kind: str, rows: int, max_length: int) -> float:
    """Relative cost of a unit: ~3 passes per training row (forward, backward), one per
    evaluated row; ~token-proportional."""
    return rows * max_length * (3.0 if kind == "train" else 1.0) / 1000.0


# --- train --------------------------------------------------------------------------------------


def cached_training(path: Path, key: str, overwrite: bool) -> dict | None:
    """The finished adapter's marker, or None. --overwrite replaces units made with other
    settings; identical ones are reused."""
    unit_overwrite = overwrite and existing_key(path) != key
    if check_output_dir(path, key, unit_overwrite):
        return read_json(path / "lorasum.json")
    return None


def train_unit(cfg: TrainConfig, path: Path, sources: list[Source], overwrite: bool, **kw) -> dict:
    from lorasum.train import adapter_key, train

    unit_overwrite = overwrite and existing_key(path) != adapter_key(cfg, sources)
    progress = kw.pop("progress", False)
    return train(cfg, path, overwrite=unit_overwrite, sources=sources, progress=progress, **kw)


# --- evaluate -----------------------------------------------------------------------------------


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


def read_json_or_none(path: Path) -> dict | None:
    """A cache file, or None when it is missing or unreadable (then it is recomputed)."""
    try:
        obj = read_json(path)
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def cached_eval(path: Path, key: str) -> dict | None:
    cached = read_json_or_none(path)
    return cached["result"] if cached is not None and cached.get("key") == key else None


@dataclass(frozen=True)
class EvalSpec:
    """One evaluation: the adapter (None = the base model) on the test rows of ``domains``.
    ``unit_key`` None: the adapter's weights file's sha256 (composed units)."""

    path: Path
    adapter_dir: Path | None
    unit_key: str | None
    domains: tuple[str, ...]

    def key(self, sources: dict[str, Source], cfg: TrainConfig) -> str:
        unit_key = self.unit_key
        if unit_key is None:
            unit_key = sha256_file(self.adapter_dir / "adapter_model.safetensors")
        return eval_key(unit_key, self.domains, sources, cfg)

    def cached(self, sources: dict[str, Source], cfg: TrainConfig) -> dict | None:
        try:
            return cached_eval(self.path, self.key(sources, cfg))
        except OSError:  # the adapter is not there yet
            return None


def eval_unit(
    spec: EvalSpec,
    sources: dict[str, Source],
    cfg: TrainConfig,
    *,
    model,
    tokenizer,
    progress: bool = False,
) -> dict:
    """Perplexity of the base model (with the adapter, if any) on the test splits, written
    atomically to ``spec.path`` with its key. The shared ``model`` is left unchanged."""
    from lorasum.evaluate import evaluate_batches

    key = spec.key(sources, cfg)
    device = next(model.parameters()).device
    srcs = [sources[d] for d in spec.domains]
    items = tokenize_cached(tokenizer, srcs, "test", cfg.max_length, cfg.answer_only)
    batches = make_batches(items, EVAL_BATCH_SIZE, tokenizer.pad_token_id, shuffle=False)
    net = model
    if spec.adapter_dir is not None:
        from peft import PeftModel

        net = PeftModel.from_pretrained(model, str(spec.adapter_dir))
    try:
        result = evaluate_batches(
            net,
            batches,
            list(spec.domains),
            device,
            autocast_dtype(cfg.precision, device),
            progress=progress,
            desc=f"eval {spec.path.stem}",
        )
    finally:
        if spec.adapter_dir is not None:
            net.unload()
    write_json(spec.path, {"key": key, "result": result})
    return result


# --- routes (lorasum.routing) -------------------------------------------------------------------


# A prompt-level router's summary of one domain, by route: (its key's name, its file's suffix
# in routers/, the tensor's name in it). ``nearest``'s are the names older studies wrote.
ROUTER_SUMMARIES = {
    "nearest": ("prompt-centroid", "", "centroid"),
    "gaussian": ("prompt-gaussian", "-gaussian", "gaussian"),
}


def router_key(source: Source, cfg: TrainConfig, router: str = "nearest") -> str:
    """What a domain's router summary depends on (beside the study's base model): its
    training rows (``gaussian``: the first `routing.GAUSSIAN_PROMPTS`), how prompts are cut,
    the precision."""
    from lorasum.routing import GAUSSIAN_PROMPTS

    settings = {
        "router": ROUTER_SUMMARIES[router][0],
        "train": source.fingerprint()["train"],
        "max_length": cfg.max_length,
        "precision": cfg.precision,
        "version": __version__,
    }
    if router == "gaussian":
        settings["prompts"] = GAUSSIAN_PROMPTS
    return config_key(settings)


def router_summary(
    routers: Path, domain: str, source: Source, cfg: TrainConfig, *, model, tokenizer,
    router: str = "nearest",
):  # fmt: skip
    """The domain's router summary — ``nearest``: `routing.prompt_centroid` of its training
    prompts; ``gaussian``: `routing.prompt_gaussian` of its first ones — cached in
    ``routers/<domain>[-gaussian].safetensors`` (with its key; written atomically, recomputed
    when the key differs or the file is unreadable). Not a unit's output, so the ledger never
    reads it."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file, save_file

    from lorasum.io import commit_temp, temp_beside
    from lorasum.routing import prompt_centroid, prompt_gaussian

    _, suffix, tensor = ROUTER_SUMMARIES[router]
    path = routers / f"{domain}{suffix}.safetensors"
    key = router_key(source, cfg, router)
    try:
        with safe_open(str(path), "pt") as f:
            if (f.metadata() or {}).get("key") == key:
                return load_file(str(path))[tensor]
    except (OSError, SafetensorError):
        pass
    device = next(model.parameters()).device
    build = prompt_centroid if router == "nearest" else prompt_gaussian
    summary = build(model, tokenizer, source, cfg.max_length, split="train",
                    amp_dtype=autocast_dtype(cfg.precision, device))  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(path, ".safetensors")
    save_file({tensor: summary.contiguous()}, tmp, metadata={"key": key})
    commit_temp(tmp, path)
    return summary


@dataclass(frozen=True)
class RoutedSpec:
    """A prompt-level route (``router``: nearest or gaussian) of one combination: ``adapters``
    (domain, single adapter dir) in the combination's order, each domain's summary cached in
    ``routers`` (`router_summary`)."""

    path: Path
    adapters: tuple[tuple[str, Path], ...]
    routers: Path
    router: str = "nearest"

    @property
    def domains(self) -> tuple[str, ...]:
        return tuple(d for d, _ in self.adapters)

    def key(self, sources: dict[str, Source], cfg: TrainConfig) -> str:
        weights = [sha256_file(p / "adapter_model.safetensors") for _, p in self.adapters]
        unit = config_key(
            {"route": self.router, "adapters": weights,
             "routers": [router_key(sources[d], cfg, self.router) for d in self.domains]}
        )  # fmt: skip
        return eval_key(unit, self.domains, sources, cfg)

    def cached(self, sources: dict[str, Source], cfg: TrainConfig) -> dict | None:
        try:
            return cached_eval(self.path, self.key(sources, cfg))
        except OSError:  # the adapters are not there yet
            return None


def routed_eval_unit(
    spec: RoutedSpec, sources: dict[str, Source], cfg: TrainConfig, *, model, tokenizer, **kw
) -> dict:
    """Every test row of the combination scored by the single adapter its prompt routes to
    (`routing.evaluate_routed`, hard top-1 on the cached summaries); written like an eval,
    with ``router_tokens``: the prompt tokens the domains' summaries read forward (each
    once per study, shared by every combination a domain is in)."""
    import torch

    from lorasum.routing import GAUSSIAN_PROMPTS, evaluate_routed, router_tokens

    key = spec.key(sources, cfg)
    summaries = torch.stack(
        [router_summary(spec.routers, d, sources[d], cfg, model=model, tokenizer=tokenizer,
                        router=spec.router) for d in spec.domains]
    )  # nearest (K, H), gaussian (K, 2, H)  # fmt: skip
    device = next(model.parameters()).device
    by = {"centroids": summaries} if spec.router == "nearest" else {"gaussians": summaries}
    result = evaluate_routed(
        model, tokenizer, dict(spec.adapters), {d: sources[d] for d in spec.domains},
        cfg.max_length, answer_only=cfg.answer_only, batch_size=EVAL_BATCH_SIZE,
        amp_dtype=autocast_dtype(cfg.precision, device), **by,
    )  # fmt: skip
    prompts = GAUSSIAN_PROMPTS if spec.router == "gaussian" else None
    result["router_tokens"] = {
        d: router_tokens(tokenizer, sources[d], cfg.max_length, prompts) for d in spec.domains
    }
    write_json(spec.path, {"key": key, "result": result})
    return result


@dataclass(frozen=True)
class ArrowSpec:
    """The ``arrow`` route of one combination: PEFT's Arrow over ``adapters`` (domain, single
    adapter dir), with `routing.arrow_options` for their number (top_k = all of them)."""

    path: Path
    adapters: tuple[tuple[str, Path], ...]

    @property
    def domains(self) -> tuple[str, ...]:
        return tuple(d for d, _ in self.adapters)

    @property
    def options(self) -> dict:
        from lorasum.routing import arrow_options

        return arrow_options(len(self.adapters))

    def key(self, sources: dict[str, Source], cfg: TrainConfig) -> str:
        from importlib.metadata import version

        unit = config_key(
            {
                "route": "arrow",
                "adapters": [
                    sha256_file(p / "adapter_model.safetensors") for _, p in self.adapters
                ],
                "configs": [sha256_file(p / "adapter_config.json") for _, p in self.adapters],
                "arrow": self.options,
                "peft": version("peft"),  # the router is PEFT's code
            }
        )
        return eval_key(unit, self.domains, sources, cfg)

    def cached(self, sources: dict[str, Source], cfg: TrainConfig) -> dict | None:
        try:
            return cached_eval(self.path, self.key(sources, cfg))
        except OSError:  # the adapters are not there yet
            return None


def arrow_eval_unit(
    spec: ArrowSpec, sources: dict[str, Source], cfg: TrainConfig, *, model, tokenizer, **kw
) -> dict:
    """Every test row of the combination scored through PEFT's Arrow over its singles
    (`routing.evaluate_arrow`); written like an eval."""
    from lorasum.routing import evaluate_arrow

    key = spec.key(sources, cfg)
    device = next(model.parameters()).device
    options = spec.options
    result = evaluate_arrow(
        model, tokenizer, dict(spec.adapters), {d: sources[d] for d in spec.domains},
        cfg.max_length, answer_only=cfg.answer_only, batch_size=EVAL_BATCH_SIZE,
        amp_dtype=autocast_dtype(cfg.precision, device), top_k=options["top_k"],
        temperature=options["router_temperature"], rng_seed=options["rng_seed"],
    )  # fmt: skip
    write_json(spec.path, {"key": key, "result": result})
    return result


# --- calibrate, compose, fit, predictors ---------------------------------------------------------


def cached_calibration(adapter_dir: Path) -> float | None:
    """0.0 when the domain adapter's input statistics are cached (nothing to run), else None."""
    from lorasum.analysis.calibration import _plan

    try:
        found = _plan(adapter_dir, None, None, None, None, None, None).cached()
    except (OSError, ValueError):
        return None
    return None if found is None else 0.0


def calibrate_unit(adapter_dir: Path, *, model, tokenizer) -> float:
    """Input statistics of a domain adapter on its own training data (cached beside it)."""
    from lorasum.analysis.calibration import calibrate

    t0 = time.perf_counter()
    calibrate(adapter_dir, model=model, tokenizer=tokenizer, device=str(model.device))
    return time.perf_counter() - t0


def cached_compose(paths: list[Path], out: Path, method: str, options: dict) -> float | None:
    """0.0 when ``out`` holds this composition already, else None."""
    from lorasum.compose import compose_key
    from lorasum.methods import MergeConfig

    if existing_key(out) is None:
        return None
    try:
        key = compose_key(paths, MergeConfig(method=method, **options))
    except (OSError, ValueError):
        return None
    return 0.0 if existing_key(out) == key else None


def compose_unit(
    paths: list[Path], out: Path, method: str, options: dict, overwrite: bool, *, model, tokenizer
) -> float:
    """One composition of the study; its seconds."""
    from lorasum.compose import compose
    from lorasum.methods import MergeConfig

    t0 = time.perf_counter()
    config = MergeConfig(method=method, **options)
    compose(paths, out, overwrite=overwrite, reuse_same=True, config=config)
    return time.perf_counter() - t0


def calibrated_key(
    method: str,
    paths: list[Path],
    merged: Path,
    val_sources: list[Source],
    options: dict,
    max_length: int,
) -> str:
    """What a fitted composition (`calibrated`, `learned`) depends on: the adapters, the
    validation rows, the merged-data training's tokens (the budget's yardstick), the options."""
    from lorasum.compose import adapter_fingerprint

    training_tokens = int(read_json(merged / "lorasum.json")["metrics"]["real_tokens"])
    settings = {"fraction": options["fraction"]} if method == "calibrated" else {"options": options}
    return config_key(
        {
            "method": method,
            "sources": [adapter_fingerprint(read_adapter(p, strict=True)) for p in paths],
            "val": [s.fingerprint()["val"] for s in val_sources],
            "training_tokens": training_tokens,
            **settings,
            "max_length": max_length,
            "version": __version__,
        }
    )


def cached_calibrated(method, paths, out, merged, val_sources, options, max_length) -> dict | None:
    if existing_key(out) is None:
        return None
    key = calibrated_key(method, paths, merged, val_sources, options, max_length)
    return read_json(out / "lorasum.json")["budget"] if existing_key(out) == key else None


def calibrated_unit(
    method: str,
    paths: list[Path],
    out: Path,
    merged: Path,
    val_sources: list[Source],
    options: dict,
    max_length: int,
    overwrite: bool,
    *,
    model,
    tokenizer,
) -> dict:
    """A fitted composition of one combination, read from ``merged`` (its adapter) for the
    merged-data training's tokens: `calibrated` (one coefficient per adapter and module type
    within ``options["fraction"]`` of those tokens) or `learned` (per-layer coefficients on
    ``options["rows"]`` validation rows of each domain, ``options["epochs"]`` passes). Returns
    the budget report (tokens, rows, steps, share of the merged-data training)."""
    from lorasum.adapters import write_adapter
    from lorasum.factors import pad_rank
    from lorasum.io import atomic_dir
    from lorasum.methods.calibrated import fit_calibrated, fit_learned

    adapters = [read_adapter(p, strict=True) for p in paths]
    key = calibrated_key(method, paths, merged, val_sources, options, max_length)
    if check_output_dir(out, key, overwrite and existing_key(out) != key):
        return read_json(out / "lorasum.json")["budget"]
    training_tokens = int(read_json(merged / "lorasum.json")["metrics"]["real_tokens"])
    t0 = time.perf_counter()
    factors = [a.modules for a in adapters]
    if method == "learned":
        fit, report = fit_learned(model, tokenizer, factors, val_sources, training_tokens,
                                  max_length=max_length, **options)  # fmt: skip
    else:
        fit, report = fit_calibrated(model, tokenizer, factors, val_sources, training_tokens,
                                     fraction=options["fraction"], max_length=max_length)  # fmt: skip
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
        "method": method,
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


def merge_aware_key(paths: list[Path], val_sources: list[Source], options: dict, cfg) -> str:
    """What a merge-aware choice depends on: the singles (their keys cover their checkpoints),
    the validation rows, the options and how rows are scored."""
    return config_key(
        {
            "method": "merge_aware",
            "adapters": [existing_key(p) for p in paths],
            "val": [s.fingerprint()["val"] for s in val_sources],
            "options": options,
            "max_length": cfg.max_length,
            "precision": cfg.precision,
            "version": __version__,
        }
    )


def cached_merge_aware(paths, out, merged, val_sources, options, cfg) -> dict | None:
    if existing_key(out) is None:
        return None
    key = merge_aware_key(paths, val_sources, options, cfg)
    return read_json(out / "lorasum.json")["budget"] if existing_key(out) == key else None


def merge_aware_unit(
    paths: list[Path],
    out: Path,
    merged: Path,
    val_sources: list[Source],
    options: dict,
    cfg: TrainConfig,
    overwrite: bool,
    *,
    model,
    tokenizer,
) -> dict:
    """The sum of one combination's merge-aware checkpoints (`lorasum.merge_aware`), with its
    cost as a share of the merged-data adapter's (``merged``) training tokens."""
    from lorasum.adapters import write_adapter
    from lorasum.io import atomic_dir
    from lorasum.merge_aware import select_checkpoints
    from lorasum.methods import MergeConfig, merge_adapters

    key = merge_aware_key(paths, val_sources, options, cfg)
    if check_output_dir(out, key, overwrite and existing_key(out) != key):
        return read_json(out / "lorasum.json")["budget"]
    training_tokens = int(read_json(merged / "lorasum.json")["metrics"]["real_tokens"])
    chosen, report = select_checkpoints(
        model, tokenizer, paths, val_sources, max_length=cfg.max_length,
        precision=cfg.precision, **options,
    )  # fmt: skip
    report = {
        **report,
        "method": "merge_aware",
        "merged_training_tokens": training_tokens,
        "fraction": report["tokens"] / training_tokens if training_tokens > 0 else float("nan"),
    }
    adapters = [read_adapter(p, strict=True) for p in chosen]
    result = merge_adapters([a.modules for a in adapters], [1.0] * len(adapters), MergeConfig())
    marker = {
        "kind": "composed",
        "key": key,
        "lorasum_version": __version__,
        "method": "merge_aware",
        "sources": [str(p) for p in chosen],
        "base_model": adapters[0].base_model,
        "budget": report,
    }
    with atomic_dir(out, marker=marker) as tmp:
        write_adapter(
            tmp,
            result.modules,
            adapters[0].base_model,
            fan_in_fan_out=any(a.config.get("fan_in_fan_out") for a in adapters),
        )
    return report


def predictors_key(adapters: Path, names: list[str], combos) -> str:
    """The activation-space predictors depend on the adapters' weights and their statistics'
    data (both in the weights' sha256 and the adapters' markers)."""
    return config_key(
        {
            "adapters": [sha256_file(adapters / n / "adapter_model.safetensors") for n in names],
            "markers": [read_json(adapters / n / "lorasum.json").get("key") for n in names],
            "combinations": [list(c) for c in combos],
            "version": __version__,
        }
    )


def cached_predictors(path: Path, adapters: Path, names: list[str], combos) -> dict | None:
    try:
        return cached_eval(path, predictors_key(adapters, names, combos))
    except (OSError, ValueError):
        return None


def predictors_unit(
    path: Path, adapters: Path, names: list[str], combos, *, model, tokenizer
) -> dict[str, dict]:
    """Every predictor family the adapters and their input statistics allow
    (`lorasum.analysis.predictors`: weight and activation space) of every combination, from
    the cached statistics; written to ``path``."""
    from lorasum.analysis import predictors
    from lorasum.analysis.calibration import calibrate

    factors = {n: read_adapter(adapters / n).modules for n in names}
    # each domain's Ĝ read from the calibration cache one module at a time: holding every
    # domain's matrices (raw and normalised, ≈725 MB each for the default model) was 8.7 GB
    # for six domains, the standard study's 11.7 GB worker peak
    grams = {
        n: calibrate(
            adapters / n, model=model, tokenizer=tokenizer, device=str(model.device)
        ).per_token(from_file=True)
        for n in names
    }
    inputs = predictors.PredictorInputs(adapters=factors, grams=grams)
    out = predictors.compute(predictors.families(predictors.ADAPTER_NEEDS), inputs, combos)
    write_json(path, {"key": predictors_key(adapters, names, combos), "result": out})
    return out


def data_predictors_key(
    model_spec: str, sources: dict[str, Source], combos, max_length: int
) -> str:
    """The adapter-free predictors depend on the base model and the domains' training rows."""
    return config_key(
        {
            "model": model_spec,
            "data": {n: s.fingerprint()["train"] for n, s in sources.items()},
            "combinations": [list(c) for c in combos],
            "max_length": max_length,
            "version": __version__,
        }
    )


def cached_data_predictors(path: Path, model_spec: str, sources, combos, max_length) -> dict | None:
    return cached_eval(path, data_predictors_key(model_spec, sources, combos, max_length))


def data_predictors_unit(
    path: Path, model_spec: str, sources: dict, combos, max_length: int, *, model, tokenizer
) -> dict[str, dict]:
    """Predictors of the base model and the data alone (`lorasum.analysis.predictors`: the
    domains' mean-gradient cosines, base loss): one per study, not per seed; written to ``path``."""
    from lorasum.analysis import predictors

    inputs = predictors.PredictorInputs(
        model=model,
        tokenizer=tokenizer,
        sources=sources,
        max_length=max_length,
        model_spec=model_spec,
    )
    out = predictors.compute(predictors.families(needing="base_model_data"), inputs, combos)
    write_json(path, {"key": data_predictors_key(model_spec, sources, combos, max_length), "result": out})  # fmt: skip
    return out
