"""The study's settings as data: presets are YAML files shipped in the package, a user's own
experiment file has the same shape, and command-line flags override either.

    preset: quick                      # a shipped preset to start from (optional in a file)
    model: default
    domains: [math, medicine, finance] # or {name: source}, or "all"
    seeds: [42]
    seed_per_domain: false
    max_order: null                    # combinations of at most this many domains
    sample: 0                          # K > 0: K combinations of each order (seeded); 0: all
    sample_seed: 0                     # the seed of that choice (not a training seed)
    methods: [sum, mean, ties]         # or {ties: {density: 0.2}, ...}
    routes: [oracle, gaussian, mixture]  # routing instead of adding (lorasum.routing.ROUTES)
    cross_domain: true                 # every single adapter on every domain's test split
    paper_variants: true               # triples: merged-data pair adapter + third single, summed
    predictors: true                   # activation-space predictors (needs calibration)
    budget: epochs                     # epochs | steps | converged (see BUDGETS)
    snapshots: [0.5, 1, 2]             # epochs along each run at which to also evaluate
    metrics: [perplexity, accuracy]    # perplexity (always, the primary) and task accuracy
    train: {rank: 4, alpha: 64, lr: 2e-4, max_train: 48, ...}   # TrainConfig fields

`resolve_study` validates the whole result once and reports every problem together.
"""

from __future__ import annotations

import contextlib
from dataclasses import MISSING, asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

from lorasum.errors import LorasumError, raise_all
from lorasum.merge_aware import MERGE_AWARE_DEFAULTS
from lorasum.methods.calibrated import LEARNED_DEFAULTS, learned_options_problem
from lorasum.settings import OptimSettings, TrainConfig

PRESET_DIR = "presets"
DEFAULT_DOMAINS = ("math", "medicine", "finance")
# Options a study gives methods that need one (the method's own papers' usual values):
# TIES keeps the top 20 % by magnitude (Yadav et al. 2023); DARE drops half at random (Yu et al.
# 2024); the truncated SVD keeps one adapter's rank.
STUDY_METHOD_OPTIONS: dict[str, dict[str, Any]] = {
    "ties": {"density": 0.2},
    "magnitude_prune": {"density": 0.2},
    "dare_linear": {"density": 0.5},
    "dare_ties": {"density": 0.5},
    "svd": {"rank": 4},
    "knots_ties": {"density": 0.2},
}
# weighted with no weights is the sum, and so is knots_ta (task arithmetic in the KnOTS basis);
# every other registered method runs in a study
NOT_IN_STUDIES = ("weighted", "knots_ta")
# Study-only methods (they need a model and validation data, so they are not merge methods of
# `lorasum compose`), both from lorasum.methods.calibrated: `calibrated`, with the share of the
# merged-data training's tokens its fit may process, and `learned`, per-layer coefficients
# fitted on K validation rows of each adapter's own domain.
STUDY_ONLY_METHODS: dict[str, dict[str, Any]] = {
    "calibrated": {"fraction": 0.01},
    "learned": dict(LEARNED_DEFAULTS),
    # not named in `methods`: the study's `merge_aware: true` adds it (it changes how the
    # single adapters train: they keep a checkpoint at every validation point)
    "merge_aware": dict(MERGE_AWARE_DEFAULTS),
}
# How long each adapter trains. The merged-data adapter of a combination always takes
# `train.epochs` passes over the union of its domains' rows.
BUDGETS = {
    "epochs": "every adapter takes train.epochs passes over its own rows (the paper's budget): "
    "a pair's merged-data adapter takes twice the optimizer steps of each single adapter",
    "steps": "every adapter of a combination takes the same number of optimizer steps, the "
    "merged-data adapter's: single adapters cycle through their rows (a domain in combinations "
    "of several sizes gets one single adapter per step count)",
    "converged": "every adapter trains at a constant learning rate (after warmup) until its "
    "validation loss has not improved for train.patience evaluations every train.eval_every "
    "steps, at most train.max_epochs passes; the best evaluation's weights are kept",
}
# The converged budget's settings where the study gives none: validation every 2 optimizer
# steps (a single adapter of the standard preset takes 8 per epoch), patience 3, a constant
# learning rate, so that the validation curve and not the schedule ends the run, and a cap of
# 10 passes that only bounds it (docs/BUDGETS.md: the linear schedule's curves had flattened
# by 3 passes because the rate had reached 0, not because the loss had).
CONVERGED_DEFAULTS = {"eval_every": 2, "patience": 3, "max_epochs": 10.0, "schedule": "constant"}
# TrainConfig fields a study sets itself (snapshots are epochs at study level; see `snapshots`)
# a_slot: a study gives each domain its own (its index), see plan.training_units
STUDY_TRAIN_EXCLUDED = ("model", "data", "eval_val", "snapshots", "stop_at", "a_slot")
# What a study measures: perplexity always (Δ%, the predictors and the best method are its);
# accuracy adds task accuracy (`lorasum.accuracy`) of every evaluation as units of their own
STUDY_METRICS = ("perplexity", "accuracy")


def _option(help: str, default: Any = MISSING, factory: Any = MISSING, **cli) -> Any:
    """A study setting: its default and its help (the `reproduce` flag's), given once.
    ``cli``: argparse extras (metavar, choices); ``flag=False``: no generated flag."""
    return field(default=default, default_factory=factory, metadata={"help": help, **cli})


@dataclass
class StudyConfig:
    """A resolved study: what `lorasum reproduce` runs (saved as experiment.yaml in the run).

    Every field is an experiment-file key (`EXPERIMENT_KEYS`) and a `reproduce` flag generated
    from it (``cli``: ``--seed-per-domain`` for ``seed_per_domain``, help from the metadata);
    ``train`` holds `TrainConfig` fields, each a flag of its own. ``key`` marks what the
    trained units depend on (`study_identity`): "always", or "set" (only where not the
    default, so that directories from before the setting existed keep their key)."""

    preset: str = _option(
        "settings to start from (YAML files shipped in lorasum/presets; default: quick, or the "
        "preset named in --config)",
        "custom",
        flag=False,  # the CLI lists the shipped presets as its choices
        key="always",
    )
    model: str = _option("base model (default: embedded SmolLM2-135M)", "default", key="always")
    domains: dict[str, str] = _option(
        "comma list of builtin domains, 'all' (every builtin domain) or NAME=SOURCE "
        "(e.g. fin=hf:org/ds); default: math,medicine,finance",
        factory=lambda: {d: d for d in DEFAULT_DOMAINS},
        key="always",
    )
    seeds: list[int] = _option(
        "run the grid once per training seed (e.g. 1,2,3): means, 95% intervals, "
        "correlation over all runs (default: --seed)",
        factory=lambda: [OptimSettings.seed],
        key="always",
    )
    seed_per_domain: bool = _option(
        "give each domain adapter its own LoRA init seed (default: one shared seed, "
        "as in the paper's scripts)",
        False,
        key="always",
    )
    max_order: int | None = _option(
        "combinations of at most this many domains (2 = pairs only; default: all sizes)",
        None,
        key="set",
    )
    # K > 0: run K of the combinations of each order ≥ 2 (all of an order that has at most K),
    # chosen by a random generator seeded with sample_seed (`study.plan.sample_combinations`);
    # the same combinations for every training seed and every rerun. 0: every combination.
    sample: int = _option(
        "run K of the combinations of each order (all of an order with at most K), "
        "chosen with --sample-seed, the same for every training seed; default 0: all",
        0,
        metavar="K",
    )
    sample_seed: int = _option(
        "seed of the --sample choice (default 0; not a training seed)", 0, metavar="S"
    )
    methods: dict[str, dict[str, Any]] = _option(
        "merge methods to compare on every combination, comma list or 'all' (every "
        "method a study can run without extra input); the sum always runs",
        factory=lambda: {"sum": {}},
    )
    routes: list[str] = _option(
        "routing instead of adding, reported beside the methods: comma list of oracle "
        "(each row's own single adapter), nearest (each row to the adapter whose "
        "training-prompt centroid is closest), gaussian (each row to the adapter under whose "
        "Gaussian of its first 64 training prompts the row is likeliest), mixture (gaussian "
        "made soft: each row scored by the mix of the adapters its tempered posterior keeps) "
        "and arrow (PEFT's per-token Arrow mix of the adapters); default none",
        factory=list,
    )
    cross_domain: bool = _option("evaluate every single adapter on every domain's test split", True)
    paper_variants: bool = _option(
        "for triples, also the merged-data pair adapter + third single", True
    )
    predictors: bool = _option(
        "calibrate the domain adapters and record the activation-space interference "
        "predictors (RMS cosine is always recorded)",
        True,
    )
    workers: int | None = _option(
        "worker processes for the study's units (default: one per CPU core, at most 4, "
        "memory allowing; one per GPU). Results do not depend on it",
        None,
    )
    budget: str = _option(
        "how long each adapter trains: epochs (default, the paper's: equal passes), "
        "steps (every adapter of a combination takes the merged-data adapter's optimizer "
        "steps) or converged (a constant learning rate, early stopping on validation loss: "
        "--eval-every, --patience, --max-epochs as a cap); see docs/BUDGETS.md",
        "epochs",
        choices=tuple(BUDGETS),
        key="set",
    )
    snapshots: list[float] = _option(
        "evaluate along each run at these epochs, e.g. 0.25,0.5,1,2,4 (each adapter "
        "trains for the last; pairs singles and merged adapters by equal epochs and steps)",
        factory=list,  # epochs; empty: none
        metavar="EPOCHS",
        key="set",
    )
    # converged budget: every single adapter also keeps its weights at each validation point,
    # and each combination's sum picks its singles' checkpoints by validation perplexity
    merge_aware: bool = _option(
        "with --budget converged: single adapters keep a checkpoint at every validation "
        "point, and each combination also sums its singles' checkpoints chosen by the sum's "
        "validation perplexity (method row merge_aware; see docs/BUDGETS.md)",
        False,
        key="set",
    )
    # lora_a frozen/disjoint: the single adapters at twice the rank and alpha (α/r kept), so
    # they train about as many parameters as the standard rank-r LoRA (exactly where a
    # module's input and output widths are equal); the merged-data baseline stays rank r
    equal_params: bool = _option(
        "with --lora-a frozen or disjoint: single adapters at twice the rank and alpha, "
        "training about as many parameters as the standard rank-r LoRA (the merged-data "
        "baseline stays rank r)",
        False,
        key="set",
    )
    # perplexity (always) and, with accuracy, task accuracy beside every evaluation
    metrics: list[str] = _option(
        "what every evaluation measures: perplexity (default; the primary metric) or "
        "perplexity,accuracy (also task accuracy, lm-eval conventions: units of their own, "
        "so adding it later reuses the study; see docs/MANUAL.md)",
        factory=lambda: ["perplexity"],
    )
    train: dict[str, Any] = _option(
        "TrainConfig fields (but STUDY_TRAIN_EXCLUDED), each its own flag",
        factory=dict,
        flag=False,
    )

    def to_dict(self) -> dict:
        """The settings as saved (experiment.yaml, results.json); ``metrics`` and
        ``equal_params`` only where they are not the default, so a study without them writes
        what it wrote before."""
        out = asdict(self)
        if out["metrics"] == ["perplexity"]:
            del out["metrics"]
        if not out["equal_params"]:
            del out["equal_params"]
        return out

    @property
    def accuracy(self) -> bool:
        return "accuracy" in self.metrics


# The keys of an experiment file (and of a preset): StudyConfig's fields
EXPERIMENT_KEYS = frozenset(f.name for f in fields(StudyConfig))
# The training settings a study takes (under ``train:``, and each a `reproduce` flag)
STUDY_TRAIN_FIELDS = tuple(
    f.name for f in fields(TrainConfig) if f.name not in STUDY_TRAIN_EXCLUDED
)
# Every setting `reproduce` takes by name (None: not given): the experiment-file keys but
# ``train``, then the training settings (they go under ``train``)
SETTING_NAMES = (*(f.name for f in fields(StudyConfig) if f.name != "train"), *STUDY_TRAIN_FIELDS)


def study_identity(study: StudyConfig, train: dict, version: str) -> dict:
    """What a study's trained units depend on (config.json, the study's key): its fields marked
    ``key="always"``, the training identity ``train``, the version, and the fields marked
    ``key="set"`` where they are not the default."""
    default = StudyConfig()
    always, where_set = {}, {}
    for f in fields(StudyConfig):
        value = getattr(study, f.name)
        if f.metadata.get("key") == "always":
            always[f.name] = value
        elif f.metadata.get("key") == "set" and value != getattr(default, f.name):
            where_set[f.name] = value
    return {**always, "train": train, "version": version, **where_set}


def preset_names() -> list[str]:
    files = resources.files("lorasum").joinpath(PRESET_DIR).iterdir()
    return sorted(f.name[: -len(".yaml")] for f in files if f.name.endswith(".yaml"))


def _load_yaml(text: str, where: str) -> dict:
    import yaml

    try:
        obj = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" line {mark.line + 1}" if mark is not None else ""
        raise LorasumError(f"{where}{at}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if obj is None:
        return {}
    if not isinstance(obj, dict):
        raise LorasumError(f"{where}: an experiment file is a mapping of settings (key: value)")
    return obj


def load_preset(name: str) -> dict:
    names = preset_names()
    if name not in names:
        raise LorasumError(f"unknown preset {name!r}; known: {', '.join(names)}")
    text = resources.files("lorasum").joinpath(PRESET_DIR, f"{name}.yaml").read_text()
    return _load_yaml(text, f"preset {name}")


def load_config_file(path: str | Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LorasumError(f"--config {path}: no such file; check the path") from None
    except (OSError, UnicodeDecodeError) as e:
        raise LorasumError(f"--config {path}: cannot read it ({e})") from None
    return _load_yaml(text, f"--config {path}")


def default_methods() -> list[str]:
    """Every registered method a study can run with no input from the user."""
    from lorasum.methods import get_method, method_names

    out = []
    for name in method_names():
        method = get_method(name)
        if name in NOT_IN_STUDIES or method.weights == "required":
            continue
        if method.required - set(STUDY_METHOD_OPTIONS.get(name, {})):
            continue
        out.append(name)
    return out + [m for m in STUDY_ONLY_METHODS if m != "merge_aware"]


def _parse_methods(value: Any, problems: list[str]) -> dict[str, dict[str, Any]]:
    """[names] / "a,b" / "all" / {name: {option: value}} → {name: options}; sum always first."""
    from lorasum.methods import MergeConfig, get_method

    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, list):
        names = [m for v in value for m in (default_methods() if v == "all" else [v])]
        value = {n: {} for n in names}
    if not isinstance(value, dict):
        problems.append("methods: give a list of method names or {name: {option: value}}")
        return {"sum": {}}
    out: dict[str, dict[str, Any]] = {"sum": {}}
    for name, options in value.items():
        options = options or {}
        if not isinstance(options, dict):
            problems.append(f"methods.{name}: options are a mapping (e.g. {{density: 0.2}})")
            continue
        if name == "merge_aware":
            problems.append(
                "methods.merge_aware: merge-aware checkpoints are a study setting (the single "
                "adapters keep a checkpoint at every validation point); set merge_aware: true "
                "(--merge-aware) with --budget converged instead"
            )
            continue
        if name == "learned":
            problem = learned_options_problem(options)
            if problem is not None:
                problems.append(f"methods.learned: {problem}")
            else:
                out["learned"] = {**LEARNED_DEFAULTS, **options}
            continue
        if name in STUDY_ONLY_METHODS:
            unknown = set(options) - set(STUDY_ONLY_METHODS[name])
            fraction = options.get("fraction", STUDY_ONLY_METHODS[name]["fraction"])
            if unknown:
                problems.append(
                    f"methods.{name}: unknown options {sorted(unknown)} (known: fraction)"
                )
            elif not isinstance(fraction, int | float) or not 0 < fraction <= 1:
                problems.append(f"methods.{name}.fraction {fraction!r}: use a share in (0, 1]")
            else:
                out[str(name)] = {"fraction": float(fraction)}
            continue
        try:
            get_method(str(name))
            if name in NOT_IN_STUDIES:
                raise LorasumError(f"method {name!r} needs weights; a study runs it as 'sum'")
            merged = {**STUDY_METHOD_OPTIONS.get(str(name), {}), **options}
            MergeConfig(method=str(name), **merged)  # validates the options
        except (LorasumError, TypeError) as e:
            problems.append(f"methods.{name}: {e}")
            continue
        out[str(name)] = merged
    return out


def _parse_routes(value: Any, problems: list[str]) -> list[str]:
    """The study's routes (a list or a comma string of `lorasum.routing.ROUTES` names)."""
    from lorasum.routing import ROUTES

    if value is None:
        return []
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        problems.append(f"routes {value!r}: give a list of route names ({', '.join(ROUTES)})")
        return []
    unknown = [v for v in value if v not in ROUTES]
    if unknown:
        problems.append(f"routes: unknown {unknown}; use some of: {', '.join(ROUTES)}")
    return [r for r in dict.fromkeys(value) if r in ROUTES]


def _parse_metrics(value: Any, problems: list[str]) -> list[str]:
    """The study's metrics (a list or a comma string of STUDY_METRICS); perplexity required."""
    if value is None:
        return ["perplexity"]
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    known = ", ".join(STUDY_METRICS)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        problems.append(f"metrics {value!r}: give a list of metric names ({known})")
        return ["perplexity"]
    unknown = [v for v in value if v not in STUDY_METRICS]
    if unknown:
        problems.append(f"metrics: unknown {unknown}; use some of: {known}")
    elif "perplexity" not in value:
        problems.append(
            "metrics: perplexity is the study's primary metric (Δ%, the predictors and the best "
            "method are perplexity's); give perplexity,accuracy"
        )
    return [m for m in STUDY_METRICS if m in value]


def _check_train_types(train: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    """Each training setting has its TrainConfig field's type (ints accepted for floats)."""
    import types
    import typing

    hints = typing.get_type_hints(TrainConfig)
    out = {}
    for key, value in train.items():
        typ = hints[key]
        optional = typing.get_origin(typ) in (typing.Union, types.UnionType)
        if optional:
            if value is None:
                out[key] = None
                continue
            typ = next(a for a in typing.get_args(typ) if a is not type(None))
        if typ is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if typ is float and isinstance(value, str):  # YAML reads 2e-4 as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        typ = typing.get_origin(typ) or typ  # list[int] -> list (isinstance needs a class)
        ok = isinstance(value, typ) and not (typ is int and isinstance(value, bool))
        if not ok:
            problems.append(
                f"train.{key}: {value!r} is not a{'n' if typ is int else ''} {typ.__name__}"
            )
            continue
        out[key] = value
    return out


def parse_domains(domains: str | list[str] | dict[str, str]) -> dict[str, str]:
    """'math,medicine', 'all' (every builtin domain), 'fin=hf:org/ds,mine=my.jsonl' or
    {name: source} → {name: source}."""
    from lorasum.data.builtin import ALL_DOMAINS

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


def _base_settings(
    preset: str | None, config_file: str | Path | None
) -> tuple[dict[str, Any], dict[str, Any], str]:
    """(preset settings, experiment-file settings, preset name) before any merging."""
    file_cfg = load_config_file(config_file) if config_file is not None else {}
    base_name = preset if preset is not None else file_cfg.get("preset", "quick")
    if config_file is not None and preset is None and "preset" not in file_cfg:
        base: dict = {}  # a file without a preset is complete on its own (TrainConfig defaults)
        base_name = "custom"
    else:
        base = load_preset(str(base_name))
    return base, file_cfg, base_name


def _merge_settings(
    base: dict[str, Any],
    file_cfg: dict[str, Any],
    overrides: dict[str, Any] | None,
    problems: list[str],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Preset ← file ← flags → (top-level settings, type-checked training settings)."""
    for where, cfg in (("preset", base), ("config", file_cfg)):
        for key in sorted(set(cfg) - EXPERIMENT_KEYS):
            problems.append(
                f"{where}: unknown setting {key!r}; use one of: {', '.join(sorted(EXPERIMENT_KEYS))}"
            )
        if "train" in cfg and not isinstance(cfg["train"], dict):
            problems.append(f"{where}: train is a mapping of training settings")
    merged: dict[str, Any] = {**base, **{k: v for k, v in file_cfg.items() if k != "train"}}
    train = {**(base.get("train") or {}), **(file_cfg.get("train") or {})}
    train_fields = set(STUDY_TRAIN_FIELDS)
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key in train_fields:
            train[key] = value
        elif key in EXPERIMENT_KEYS:
            merged[key] = value
        else:
            problems.append(f"unknown study setting {key!r}")
    for key in sorted(set(train) - train_fields):
        problems.append(
            f"train: unknown setting {key!r}; use one of: {', '.join(sorted(train_fields))}"
        )
    train = {k: v for k, v in train.items() if k in train_fields}
    return merged, _check_train_types(train, problems)


def _set_seeds(
    study: StudyConfig, merged: dict[str, Any], train: dict[str, Any], problems: list[str]
) -> None:
    """``study.seeds`` from the settings (default: the training seed); kept as is if invalid."""
    seeds = merged.get("seeds")
    if seeds is None:
        seeds = [train.get("seed", TrainConfig.seed)]
    if isinstance(seeds, int):
        seeds = [seeds]
    if isinstance(seeds, str):
        seeds = [s for s in seeds.split(",") if s.strip()]
    try:
        study.seeds = [int(s) for s in seeds]
    except (TypeError, ValueError):
        problems.append(f"--seeds {seeds!r}: not integers (e.g. 1,2,3)")
    if len(set(study.seeds)) != len(study.seeds):
        problems.append(f"--seeds {study.seeds} repeats a seed; give distinct seeds")


def _set_flags_and_counts(study: StudyConfig, merged: dict[str, Any], problems: list[str]) -> None:
    """The true/false switches and the integer settings (max_order, workers, sample,
    sample_seed) of ``study``."""
    switches = ("seed_per_domain", "cross_domain", "paper_variants", "predictors")
    for flag in (*switches, "merge_aware", "equal_params"):
        value = merged.get(flag, getattr(study, flag))
        if not isinstance(value, bool):
            problems.append(f"{flag}: {value!r} is not true/false")
        else:
            setattr(study, flag, value)
    hints = {
        "max_order": "combinations have at least 2 domains",
        "workers": "use 1 or more worker processes",
        "sample": "use 0 (every combination) or K > 0 combinations of each order",
        "sample_seed": "use an integer ≥ 0",
    }
    least = {"max_order": 2, "workers": 1, "sample": 0, "sample_seed": 0}
    for key, hint in hints.items():
        value = merged.get(key)
        if value is None:
            continue
        flag = f"--{key.replace('_', '-')}"
        if not isinstance(value, int) or isinstance(value, bool):
            problems.append(f"{flag} {value!r}: not an integer; {hint}")
        elif value < least[key]:
            problems.append(f"{flag} {value}: {hint}")
        else:
            setattr(study, key, value)


def _check_seed_spacing(study: StudyConfig, problems: list[str]) -> None:
    """With seed_per_domain, seeds closer than the domain count would share an init."""
    if (
        study.seed_per_domain
        and len(study.seeds) > 1
        and max(study.seeds) - min(study.seeds) < len(study.domains)
    ):
        problems.append(
            "seed_per_domain offsets each domain's seed by its index; space the seeds at least "
            f"{len(study.domains)} apart (e.g. 0,100,200) so runs never share an init"
        )


def resolve_study(
    preset: str | None = "quick",
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> StudyConfig:
    """Preset ← experiment file ← flags (later wins); every problem reported at once.

    ``overrides``: top-level keys (model, domains, seeds, …) and TrainConfig field names (put
    under ``train``); None values are ignored (flag not given).
    """
    base, file_cfg, base_name = _base_settings(preset, config_file)
    problems: list[str] = []
    merged, train = _merge_settings(base, file_cfg, overrides, problems)

    study = StudyConfig(preset=str(merged.get("preset", base_name)))
    study.model = str(merged.get("model", study.model))
    try:
        study.domains = parse_domains(merged.get("domains", list(DEFAULT_DOMAINS)))
    except LorasumError as e:
        problems.append(str(e))
    _set_seeds(study, merged, train, problems)
    _set_flags_and_counts(study, merged, problems)
    study.methods = _parse_methods(merged.get("methods", ["sum"]), problems)
    study.routes = _parse_routes(merged.get("routes"), problems)
    study.metrics = _parse_metrics(merged.get("metrics"), problems)
    _check_seed_spacing(study, problems)
    study.budget, study.snapshots = _parse_budget(merged, train, problems)
    if study.merge_aware and study.budget != "converged":
        problems.append(
            "merge_aware picks checkpoints among a converged run's validation points; use it "
            f"with --budget converged (this study's budget is {study.budget})"
        )
    if study.equal_params and train.get("lora_a", "trained") not in ("frozen", "disjoint"):
        problems.append(
            "equal_params doubles the rank of single adapters whose A is frozen, to train as "
            "many parameters as a standard LoRA; add --lora-a frozen or --lora-a disjoint"
        )
    try:
        TrainConfig(model=study.model, data=["-"], **{**train, "eval_val": False})
    except LorasumError as e:
        problems.append(str(e))
    except TypeError as e:
        problems.append(f"train: {e}")
    study.train = train
    raise_all(problems, "invalid study settings")
    return study


def _parse_budget(merged: dict, train: dict, problems: list[str]) -> tuple[str, list[float]]:
    """The training budget and the snapshot epochs; fills ``train`` with what they imply."""
    budget = merged.get("budget") or "epochs"
    if budget not in BUDGETS:
        problems.append(f"--budget {budget!r}: use one of {', '.join(BUDGETS)}")
        return "epochs", []
    if budget == "converged":
        for k, v in CONVERGED_DEFAULTS.items():
            train.setdefault(k, v)
        if not train["eval_every"]:
            problems.append("budget converged needs train.eval_every > 0 (steps between checks)")
    elif train.get("eval_every"):
        problems.append(
            f"train.eval_every is the converged budget's setting; use --budget converged "
            f"(this study's budget is {budget})"
        )
    snaps = merged.get("snapshots") or []
    if isinstance(snaps, str):
        snaps = [s for s in snaps.split(",") if s.strip()]
    if isinstance(snaps, int | float):
        snaps = [snaps]
    try:
        epochs = sorted({float(s) for s in snaps})
    except (TypeError, ValueError):
        problems.append(f"--snapshots {snaps!r}: give epochs as numbers (e.g. 0.5,1,2)")
        return budget, []
    if any(e <= 0 for e in epochs):
        problems.append(f"--snapshots {epochs}: epochs must be > 0")
    elif epochs and budget != "epochs":
        problems.append(
            "--snapshots pair single and merged adapters by equal epochs and equal steps along "
            "one run each; use them with --budget epochs"
        )
    elif epochs:
        if len(epochs) < 2:
            problems.append("--snapshots: give at least two epochs (the last is the run's length)")
        train["epochs"] = epochs[-1]  # each run is as long as its last snapshot
    return budget, epochs


def dump_yaml(study: StudyConfig) -> str:
    import yaml

    return yaml.safe_dump(study.to_dict(), sort_keys=False, allow_unicode=True)
