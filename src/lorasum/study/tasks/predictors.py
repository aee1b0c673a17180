"""The study's predictors of Δ%: `PredictorsTask` (per seed: activation-space predictors of its
single adapters, from their input statistics) and `DataPredictorsTask` (per study: predictors of
the base model and the data alone, from each domain's `DomainGradientsTask`). The predictors
themselves are the registered families of `lorasum.analysis.predictors`; these tasks only cache
them in the study."""

from __future__ import annotations

from pathlib import Path

from lorasum._version import __version__
from lorasum.adapters import read_adapter
from lorasum.data.sources import Source
from lorasum.io import config_key, read_json, sha256_file, write_json
from lorasum.study import names
from lorasum.study.tasks.base import COMPOSE_COST_ROWS, Resources, Task, job_cost, task_type
from lorasum.study.tasks.evaluate import cached_eval
from lorasum.study.tasks.gradients import DomainGradientsTask


@task_type
class PredictorsTask(Task):
    """Activation-space predictors of every combination in ``combos`` from the singles of
    ``domains`` (under ``adapters``, their statistics computed by ``calibrations``); written to
    ``path`` with its key."""

    kind = "predictors"
    calibrations: tuple[Task, ...]
    adapters: Path  # the seed's adapters/ directory
    domains: tuple[str, ...]
    combos: tuple[tuple[str, ...], ...]
    path: Path
    max_length: int  # the study's row length (the cost's unit)

    @property
    def name(self) -> str:
        return names.PREDICTORS

    @property
    def label(self) -> str:
        return f"predictors seed {self.seed}"

    def dependencies(self) -> tuple[Task, ...]:
        return self.calibrations

    def cost(self) -> float:
        return job_cost("eval", COMPOSE_COST_ROWS, self.max_length)

    def output(self) -> Path:
        return self.path

    def key(self) -> str:
        """The adapters' weights and their statistics' data (both in the weights' sha256 and
        the adapters' markers)."""
        adapters, domains = self.adapters, self.domains
        return config_key(
            {
                "adapters": [
                    sha256_file(adapters / n / "adapter_model.safetensors") for n in domains
                ],
                "markers": [read_json(adapters / n / "lorasum.json").get("key") for n in domains],
                "combinations": [list(c) for c in self.combos],
                "version": __version__,
            }
        )

    def cached(self) -> dict | None:
        try:
            return cached_eval(self.path, self.key())
        except (OSError, ValueError):
            return None

    def run(self, *, model, tokenizer) -> dict[str, dict]:
        from lorasum.analysis import predictors
        from lorasum.analysis.calibration import calibrate

        adapters, domains = self.adapters, self.domains
        factors = {n: read_adapter(adapters / n).modules for n in domains}
        # each domain's Ĝ read from the calibration cache one module at a time: holding every
        # domain's matrices (raw and normalised, ≈725 MB each for the default model) was 8.7 GB
        # for six domains, the standard study's 11.7 GB worker peak
        grams = {
            n: calibrate(
                adapters / n, model=model, tokenizer=tokenizer, device=str(model.device)
            ).per_token(from_file=True)
            for n in domains
        }
        inputs = predictors.PredictorInputs(adapters=factors, grams=grams)
        families = predictors.families(predictors.ADAPTER_NEEDS)
        out = predictors.compute(families, inputs, list(self.combos))
        write_json(self.path, {"key": self.key(), "result": out})
        return out


@task_type
class DataPredictorsTask(Task):
    """Predictors of the base model and the data alone (`lorasum.analysis.predictors`: the
    domains' mean-gradient cosines, base loss): one per study, not per seed; it compares the
    statistics its ``gradients`` units saved (one per domain of ``combos``) and writes the
    values to ``path``."""

    kind = "predictors"
    model_spec: str
    sources: dict[str, Source]
    gradients: tuple[DomainGradientsTask, ...]
    combos: tuple[tuple[str, ...], ...]
    max_length: int
    path: Path

    @property
    def name(self) -> str:
        return names.DATA_PREDICTORS

    @property
    def label(self) -> str:
        return "predictors of the data"

    def dependencies(self) -> tuple[Task, ...]:
        return self.gradients

    def resources(self) -> Resources:
        return Resources(memory_gb=4.0)  # one module of every domain, and its float64 copy

    def cost(self) -> float:
        return job_cost("eval", COMPOSE_COST_ROWS, self.max_length)

    def output(self) -> Path:
        return self.path

    def key(self) -> str:
        """The base model and the domains' training rows: what the statistics it compares
        depend on (`DomainGradientsTask.key`: with the row length, which is here too), so the
        key of the unit that computed them itself is kept."""
        return config_key(
            {
                "model": self.model_spec,
                "data": {n: s.fingerprint()["train"] for n, s in self.sources.items()},
                "combinations": [list(c) for c in self.combos],
                "max_length": self.max_length,
                "version": __version__,
            }
        )

    def cached(self) -> dict | None:
        return cached_eval(self.path, self.key())

    def run(self, *, model, tokenizer) -> dict[str, dict]:
        """Every family that needs the base model and the data, the data family from the saved
        statistics (read one module of every domain at a time)."""
        from lorasum.analysis import predictors
        from lorasum.errors import LorasumError

        grads = {t.domain: t.statistics() for t in self.gradients}
        missing = [d for d, g in grads.items() if g is None]
        if missing:
            raise LorasumError(
                f"the gradient statistics of {', '.join(missing)} are gone from the study; "
                "run the study again"
            )
        inputs = predictors.PredictorInputs(
            model=model,
            tokenizer=tokenizer,
            sources=self.sources,
            max_length=self.max_length,
            model_spec=self.model_spec,
            gradients=grads,
        )
        families = predictors.families(needing="base_model_data")
        out = predictors.compute(families, inputs, list(self.combos))
        write_json(self.path, {"key": self.key(), "result": out})
        return out
