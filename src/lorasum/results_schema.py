"""results.json, typed: what a study writes (`lorasum.study.reproduce.aggregate`) and its
report reads (`lorasum.report`), with its version and the migrations from older files.

`Results` is the file's top level; the combinations' table (`Combination`: means over seeds,
`MethodResult`, `RouteResult`, `PaperVariant`, `SeedRow`), the pairs, the training budget, the
snapshots and the accuracy summary are records of their own (`lorasum.records`). Blocks the
report passes on or shows as they are (statistics, predictions, the manifest, configurations,
training metrics) stay plain dicts: typing them would only repeat the functions that make them
(`lorasum.analysis.statistics`, `lorasum.analysis.forecast`, `lorasum.study.results`).

Versions: ``SCHEMA_VERSION`` is written as ``schema_version``; a file without it is version 1
(lorasum 0.1.0, before the schema). `load_results` reads any version up to ours, migrating it
step by step (`MIGRATIONS`), and refuses a newer one in one line. Combinations are lists of
domain names everywhere; records that also name one by its joined name (``"a+b"``, the key that
per-combination dicts and plotted points use) keep that name beside the list.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorasum.data.sources import combo_name
from lorasum.errors import LorasumError
from lorasum.records import Record, RecordError, optional

SCHEMA_VERSION = 2
NEWER = "read it with the lorasum that wrote it, or a newer one"


# --- a combination's numbers ------------------------------------------------------------------


@dataclass(kw_only=True)
class DomainPerplexity(Record):
    """One member domain's test perplexity under each side (means over seeds)."""

    ppl_sum: float | None = None
    ppl_merged: float | None = None
    ppl_base: float | None = None
    ppl_single: float | None = None  # that domain's own single adapter
    delta_pct: float | None = None


@dataclass(kw_only=True)
class MethodResult(Record):
    """One composition method on one combination (means over seeds)."""

    ppl: float | None = None
    delta_pct: float | None = None  # vs the merged-data adapter
    ci95: list[float] | None = None  # of delta_pct over seeds; None with one seed
    delta_vs_singles_pct: float | None = None
    category: str | None = None  # baseline, data-free, calibration, calibrated
    per_domain: dict[str, float] | None = None  # perplexity per member domain
    accuracy: dict | None = optional()  # studies with accuracy: `study.accuracy.add_accuracy`


@dataclass(kw_only=True)
class RouteResult(Record):
    """One route (a single adapter per row, or Arrow's per-token mix) on one combination."""

    ppl: float | None = None
    delta_pct: float | None = None
    ci95: list[float] | None = None
    routing_accuracy: float | None = None  # % of rows sent to their own domain's adapter
    router_tokens: int | None = None  # prompt tokens the router's summaries read
    adapter_rows: float | None = optional()  # a soft route's adapter forwards per row (mixture)


@dataclass(kw_only=True)
class PaperVariant(Record):
    """The paper's variant of a triple: merged-data adapter of ``pair`` + single ``third``."""

    pair: list[str]
    third: str
    ppl: float | None = None
    delta_pct: float | None = None
    ci95: list[float] | None = None


@dataclass(kw_only=True)
class SeedMethod(Record):
    ppl: float | None = None
    delta_pct: float | None = None
    delta_vs_singles_pct: float | None = None
    delta_acc_pts: float | None = optional()


@dataclass(kw_only=True)
class SeedRoute(Record):
    ppl: float | None = None
    delta_pct: float | None = None
    routing_accuracy: float | None = None
    router_tokens: int | None = None
    adapter_rows: float | None = optional()


@dataclass(kw_only=True)
class SeedRow(Record):
    """One seed's numbers of a combination (the points its means and statistics are over)."""

    seed: int | None = None
    ppl_sum: float | None = None
    ppl_merged: float | None = None
    ppl_base: float | None = None
    delta_pct: float | None = None
    rms_cosine: float | None = None
    ppl_singles: float | None = None
    delta_vs_singles_pct: float | None = None
    merged_gain_pct: float | None = None
    predictors: dict[str, float | None] | None = None
    methods: dict[str, SeedMethod] | None = None
    routes: dict[str, SeedRoute] | None = optional()
    accuracy: dict | None = optional()  # merged and per-method scores of this seed
    delta_acc_pts: float | None = optional()  # the sum's Δ accuracy (a prediction target)


@dataclass(kw_only=True)
class Combination(Record):
    """One combination: means over seeds of perplexities and Δ%, with 95 % t-intervals in
    ``ci95`` (keyed by the mean's field name), per method, per route, per seed."""

    domains: list[str]
    ppl_sum: float | None = None
    ppl_merged: float | None = None
    ppl_base: float | None = None
    delta_pct: float | None = None  # the naive sum vs merged-data training
    rms_cosine: float | None = None
    ppl_singles: float | None = None
    delta_vs_singles_pct: float | None = None
    merged_gain_pct: float | None = None
    ci95: dict[str, list[float] | None] | None = None
    tokens: int | None = None  # counted test tokens of the combination's test set
    per_domain: dict[str, DomainPerplexity] | None = None
    predictors: dict[str, float | None] | None = None
    methods: dict[str, MethodResult] | None = None
    best_method: str | None = None
    routes: dict[str, RouteResult] | None = optional()
    paper_variants: list[PaperVariant] | None = optional()  # triples only
    per_seed: list[SeedRow] | None = None
    accuracy: dict | None = optional()  # merged, base, singles, best methods by accuracy


# --- the adapters and their training ----------------------------------------------------------


@dataclass(kw_only=True)
class Pair(Record):
    """Two domain adapters of one seed compared (`analysis.similarity.pair_similarity`)."""

    seed: int | None = None
    a: str
    b: str
    rms_cosine: float | None = None
    global_cosine: float | None = None
    modules: dict[str, float] | None = None  # cosine per module
    unshared_modules: list[str] | None = None


@dataclass(kw_only=True)
class Single(Record):
    """A domain's own adapter: test perplexity (mean over seeds) and training per seed."""

    perplexity: float | None = None
    tokens: int | None = None
    train: list[dict] | None = None  # the training metrics of each seed (lorasum.json)


@dataclass(kw_only=True)
class Base(Record):
    per_domain: dict[str, float] | None = None  # the base model's test perplexity per domain
    accuracy: dict | None = optional()  # per domain, studies with accuracy


@dataclass(kw_only=True)
class Correlation(Record):
    """Pearson r with its p-value and the least-squares line (`analysis.statistics`)."""

    n: int | None = None
    pearson_r: float | None = None
    p_value: float | None = None
    slope: float | None = None
    intercept: float | None = None


@dataclass(kw_only=True)
class BudgetCombination(Record):
    """One combination's training compute on each side (`study.budget.budget_summary`)."""

    combination: str  # the joined name
    domains: list[str] | None = None
    singles: list[str] | None = None  # the single adapters its sum composes
    single_steps_mean: list[float] | None = None
    merged_steps_mean: float | None = None
    single_tokens_mean: float | None = None
    merged_tokens_mean: float | None = None
    per_seed: list[dict] | None = None


@dataclass(kw_only=True)
class TrainingBudget(Record):
    name: str  # epochs, steps or converged
    rule: str | None = None
    combinations: list[BudgetCombination] | None = None
    # per adapter unit, per seed: steps, best_step, stop_step, stopped_by, schedule (older
    # files: stopped_early only), kept as dicts for the report's fallbacks
    adapters: dict[str, list[dict]] | None = None


@dataclass(kw_only=True)
class SnapshotCombination(Record):
    """Δ% along the runs of one combination, paired by equal epochs and by equal steps."""

    combination: str
    domains: list[str] | None = None
    equal_epochs: list[dict] | None = None  # {epochs, ..., delta_pct: {method: mean, ci95, n}}
    equal_steps: list[dict] | None = None
    per_seed: dict[str, dict] | None = None  # seed (as a string) → that seed's points


@dataclass(kw_only=True)
class Snapshots(Record):
    epochs: list[float] | None = None
    methods: list[str] | None = None
    combinations: list[SnapshotCombination] | None = None


@dataclass(kw_only=True)
class BestMethod(Record):
    """Whether a combination's best method by perplexity is among the best by accuracy."""

    combination: str
    domains: list[str] | None = None
    best_by_perplexity: str | None = None
    best_by_accuracy: list[str] | None = None
    differs: bool | None = None


@dataclass(kw_only=True)
class AccuracySummary(Record):
    """Study-wide task accuracy (`study.accuracy.study_accuracy`)."""

    metrics: list[str] | None = None
    max_new_tokens: int | None = None
    domains: dict[str, dict] | None = None  # how each domain's rows are scored, and how many
    skipped_domains: list[str] | None = None
    rank_correlation: dict | None = None  # Spearman ρ of Δ% and Δ accuracy, with its points
    best_method: list[BestMethod] | None = None
    rank_changes: list[str] | None = None  # joined names of the combinations where they differ


# --- the file ---------------------------------------------------------------------------------


@dataclass(kw_only=True)
class Results(Record):
    """results.json. Free-form blocks: ``sample`` (`study.layout.sample_summary`), ``config``
    (experiment.yaml), ``train_config`` (TrainConfig), ``budget`` (token policy and the
    fitted methods' fits), ``data`` (split fingerprints), ``cross_domain``, ``statistics`` and
    the ``prediction*`` blocks (per predictor), ``paper_comparison``, ``train_curves`` and
    ``manifest`` (versions, hardware, splits, seconds per unit)."""

    schema_version: int = SCHEMA_VERSION
    lorasum_version: str | None = None
    preset: str | None
    model: str
    domains: dict[str, str]  # name → source
    seeds: list[int] | None = None
    seed_per_domain: bool | None = None
    max_order: int | None = None
    sample: dict | None = None
    config: dict | None = None
    train_config: dict
    budget: dict | None = None
    data: dict | None = None
    base: Base | None = None
    singles: dict[str, Single] | None = None
    merged_training: dict[str, list[dict]] | None = None  # unit name → metrics per seed
    pairs: list[Pair]
    combinations: list[Combination]
    cross_domain: dict | None = None
    correlation: Correlation
    correlation_of_means: Correlation | None = None
    statistics: dict | None = None
    prediction: dict | None = None
    prediction_vs_singles: dict | None = None
    paper_comparison: dict | None = None
    train_curves: dict[str, list] | None = None  # "seed-<s>/<unit>" → [[step, loss], ...]
    training_budget: TrainingBudget | None = None
    snapshots: Snapshots | None = None
    wall_seconds: float | None = None
    accuracy: AccuracySummary | None = optional()
    prediction_vs_accuracy: dict | None = optional()
    manifest: dict | None = None

    def to_json(self) -> str:
        """The file's text as `lorasum.io.write_json` writes it (strict JSON, indented)."""
        from lorasum.io import dumps_strict

        return dumps_strict(self.to_dict()) + "\n"


# --- versions ---------------------------------------------------------------------------------


def _with_domains(record: dict, known: dict[str, list[str]]) -> dict:
    """``record`` with ``domains`` after its joined ``combination`` name: the combination's own
    list where the file has that combination, else the name's parts (domain names hold no
    '+': `study.config` refuses them)."""
    if not isinstance(record, dict) or "domains" in record or "combination" not in record:
        return record
    name = record["combination"]
    out = {}
    for k, v in record.items():
        out[k] = v
        if k == "combination":
            out["domains"] = list(known.get(name) or str(name).split("+"))
    return out


def _v1_to_v2(results: dict) -> dict:
    """Version 1 (no ``schema_version``, lorasum 0.1.0) → 2: the version, and ``domains``
    beside the joined name in the records the report reads per combination (training budget,
    snapshots, best method by accuracy)."""
    known = {
        combo_name(r["domains"]): list(r["domains"])
        for r in results.get("combinations") or []
        if isinstance(r, dict) and isinstance(r.get("domains"), list)
    }
    for key in ("training_budget", "snapshots"):
        block = results.get(key)
        if isinstance(block, dict) and isinstance(block.get("combinations"), list):
            block["combinations"] = [_with_domains(c, known) for c in block["combinations"]]
    acc = results.get("accuracy")
    if isinstance(acc, dict) and isinstance(acc.get("best_method"), list):
        acc["best_method"] = [_with_domains(b, known) for b in acc["best_method"]]
    return results


# MIGRATIONS[k] turns a version-k file (parsed) into a version k+1 file; one per version below
# SCHEMA_VERSION. Each may change its argument (`upgrade` hands it a copy).
MIGRATIONS: dict[int, Callable[[dict], dict]] = {1: _v1_to_v2}


def file_version(results: dict, source: str) -> int:
    """The schema version of a parsed results.json (1 when it has none)."""
    version = results.get("schema_version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise LorasumError(
            f"{source} has schema_version {version!r}, not a version number; rerun "
            "`lorasum reproduce` to write it again"
        )
    return version


def upgrade(results: dict, source: str = "results") -> dict:
    """A parsed results.json of any version up to ours, as a current-version dict (a copy);
    a newer version is refused."""
    version = file_version(results, source)
    if version > SCHEMA_VERSION:
        raise LorasumError(
            f"{source} has results schema version {version}; this lorasum reads versions up "
            f"to {SCHEMA_VERSION}: {NEWER}"
        )
    out = copy.deepcopy(results)
    while version < SCHEMA_VERSION:
        out = MIGRATIONS[version](out)
        version += 1
        out = {"schema_version": version, **{k: v for k, v in out.items() if k != "schema_version"}}
    return out


REQUIRED = ("model", "preset", "domains", "train_config", "combinations", "pairs", "correlation")
NOT_RESULTS = "pass the --out directory of `lorasum reproduce`"


def results_from_dict(results: Any, source: str = "results") -> Results:
    """The typed results of a parsed results.json (any version up to ours, migrated)."""
    if not isinstance(results, dict):
        raise LorasumError(
            f"{source} is not a lorasum study's results (not an object); {NOT_RESULTS}"
        )
    results = upgrade(results, source)
    missing = [k for k in REQUIRED if k not in results]
    if missing or not results.get("combinations"):
        raise LorasumError(
            f"{source} is not a lorasum study's results (missing "
            f"{', '.join(missing) or 'combinations'}); {NOT_RESULTS}"
        )
    try:
        return Results.from_dict(results)
    except RecordError as e:
        raise LorasumError(
            f"{source} is not a lorasum study's results ({e}); {NOT_RESULTS}"
        ) from None


def as_results(results: Results | dict) -> Results:
    """``results`` itself, or the typed results of a parsed results.json (the report accepts
    both)."""
    return results if isinstance(results, Results) else results_from_dict(results)


def load_results(path: str | Path) -> Results:
    """A results.json file, typed (older versions migrated, newer ones refused)."""
    path = Path(path)
    try:
        parsed = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise LorasumError(f"{path} is not valid JSON ({e}); rerun `lorasum reproduce`") from e
    return results_from_dict(parsed, str(path))
