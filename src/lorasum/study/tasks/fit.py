"""Compositions fitted on validation rows, the study-only methods: `FitTask` (``calibrated``:
one coefficient per adapter and module type; ``learned``: per-layer coefficients,
`lorasum.methods.calibrated`) and `MergeAwareTask` (the sum of the singles' checkpoints chosen
by validation perplexity, `lorasum.merge_aware`). Each reports its cost as a share of the
combination's merged-data training's tokens, read from that adapter's marker."""

from __future__ import annotations

import time
from pathlib import Path

from lorasum._version import __version__
from lorasum.adapters import read_adapter
from lorasum.data.sources import Source
from lorasum.io import check_output_dir, config_key, existing_key, read_json
from lorasum.settings import TrainConfig
from lorasum.study import names
from lorasum.study.tasks.base import COMPOSE_COST_ROWS, AdapterTask, Task, job_cost, task_type
from lorasum.study.tasks.train import TrainTask


def merged_training_tokens(merged: Path) -> int:
    """The merged-data adapter's training tokens (the fitted methods' budget yardstick)."""
    return int(read_json(merged / "lorasum.json")["metrics"]["real_tokens"])


@task_type
class FittedTask(AdapterTask):
    """A composition of ``combo``'s ``singles`` fitted on the validation rows of its domains,
    written to ``out`` with its budget report in the marker; ``merged``: the combination's
    merged-data training, whose tokens the report compares with."""

    kind = "fit"
    method: str  # a key of study.config.STUDY_ONLY_METHODS
    combo: tuple[str, ...]
    options: dict
    singles: tuple[TrainTask, ...]
    merged: TrainTask
    val_sources: tuple[Source, ...]  # the combination's domains
    out: Path
    overwrite: bool = False

    @property
    def name(self) -> str:
        return names.composition_name(self.method, self.combo)

    @property
    def paths(self) -> list[Path]:
        return [t.path for t in self.singles]

    def dependencies(self) -> tuple[Task, ...]:
        return (*self.singles, self.merged)

    def cost(self) -> float:
        return job_cost("eval", COMPOSE_COST_ROWS, self.merged.cfg.max_length)

    def output(self) -> Path:
        return self.out

    def cached(self) -> dict | None:
        """The budget report of the finished fit, or None."""
        if existing_key(self.out) is None:
            return None
        key = self.key()
        return (
            read_json(self.out / "lorasum.json")["budget"]
            if existing_key(self.out) == key
            else None
        )

    def _reuse(self, key: str) -> bool:
        return check_output_dir(self.out, key, self.overwrite and existing_key(self.out) != key)


@task_type
class FitTask(FittedTask):
    """``calibrated`` (one coefficient per adapter and module type within ``options["fraction"]``
    of the merged-data training's tokens) or ``learned`` (per-layer coefficients on
    ``options["rows"]`` validation rows of each domain, ``options["epochs"]`` passes)."""

    max_length: int

    def key(self) -> str:
        """The adapters, the validation rows, the merged-data training's tokens (the budget's
        yardstick), the options."""
        from lorasum.compose import adapter_fingerprint

        options = self.options
        settings = (
            {"fraction": options["fraction"]}
            if self.method == "calibrated"
            else {"options": options}
        )
        return config_key(
            {
                "method": self.method,
                "sources": [adapter_fingerprint(read_adapter(p, strict=True)) for p in self.paths],
                "val": [s.fingerprint()["val"] for s in self.val_sources],
                "training_tokens": merged_training_tokens(self.merged.path),
                **settings,
                "max_length": self.max_length,
                "version": __version__,
            }
        )

    def run(self, *, model, tokenizer) -> dict:
        """The fit, written as a one-rank adapter; the budget report (tokens, rows, steps,
        share of the merged-data training)."""
        from lorasum.adapters import write_adapter
        from lorasum.factors import pad_rank
        from lorasum.io import atomic_dir
        from lorasum.methods.calibrated import fit_calibrated, fit_learned

        adapters = [read_adapter(p, strict=True) for p in self.paths]
        key = self.key()
        if self._reuse(key):
            return read_json(self.out / "lorasum.json")["budget"]
        training_tokens = merged_training_tokens(self.merged.path)
        t0 = time.perf_counter()
        factors = [a.modules for a in adapters]
        val, max_length = list(self.val_sources), self.max_length
        if self.method == "learned":
            fit, report = fit_learned(
                model,
                tokenizer,
                factors,
                val,
                training_tokens,
                max_length=max_length,
                **self.options,
            )
        else:
            fit, report = fit_calibrated(
                model,
                tokenizer,
                factors,
                val,
                training_tokens,
                fraction=self.options["fraction"],
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
            "method": self.method,
            "sources": [str(p) for p in self.paths],
            "base_model": adapters[0].base_model,
            "budget": report,
        }
        with atomic_dir(self.out, marker=marker) as tmp:
            write_adapter(
                tmp,
                modules,
                adapters[0].base_model,
                fan_in_fan_out=any(a.config.get("fan_in_fan_out") for a in adapters),
            )
        return report


@task_type
class MergeAwareTask(FittedTask):
    """The sum of one combination's merge-aware checkpoints (`lorasum.merge_aware`)."""

    cfg: TrainConfig  # the study's: max_length, precision

    def key(self) -> str:
        """The singles (their keys cover their checkpoints), the validation rows, the options
        and how rows are scored."""
        return config_key(
            {
                "method": "merge_aware",
                "adapters": [existing_key(p) for p in self.paths],
                "val": [s.fingerprint()["val"] for s in self.val_sources],
                "options": self.options,
                "max_length": self.cfg.max_length,
                "precision": self.cfg.precision,
                "version": __version__,
            }
        )

    def run(self, *, model, tokenizer) -> dict:
        """The chosen checkpoints, summed; the report with its cost as a share of the
        merged-data adapter's training tokens."""
        from lorasum.adapters import write_adapter
        from lorasum.io import atomic_dir
        from lorasum.merge_aware import select_checkpoints
        from lorasum.methods import MergeConfig, merge_adapters

        key, cfg = self.key(), self.cfg
        if self._reuse(key):
            return read_json(self.out / "lorasum.json")["budget"]
        training_tokens = merged_training_tokens(self.merged.path)
        chosen, report = select_checkpoints(
            model,
            tokenizer,
            self.paths,
            list(self.val_sources),
            max_length=cfg.max_length,
            precision=cfg.precision,
            **self.options,
        )
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
        with atomic_dir(self.out, marker=marker) as tmp:
            write_adapter(
                tmp,
                result.modules,
                adapters[0].base_model,
                fan_in_fan_out=any(a.config.get("fan_in_fan_out") for a in adapters),
            )
        return report


def fitted_task_type(method: str) -> type[FittedTask] | None:
    """The task type of a study-only method (`study.config.STUDY_ONLY_METHODS`), None for a
    merge method of the registry (a `ComposeTask`)."""
    return {"calibrated": FitTask, "learned": FitTask, "merge_aware": MergeAwareTask}.get(method)
