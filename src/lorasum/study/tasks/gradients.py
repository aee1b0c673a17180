"""`DomainGradientsTask`: one domain's mean gradients at the base model and its base loss
(`lorasum.analysis.gradients`), the statistics the study's adapter-free predictors compare.

One unit per domain, seed independent, written into the study directory
(``<out>/gradients/<domain>/``: one safetensors file per module group and ``lorasum.json``),
so that on a cluster every node reads them from the shared study directory and the domains
are computed in parallel. The per-node cache in $LORASUM_HOME/gradients stays a second
level, under the key it always had: a unit first looks there (what `lorasum predict
--domains`, an older study or another study on this node computed), computes into it
otherwise, and copies the files into the study.
"""

from __future__ import annotations

from pathlib import Path

from lorasum._version import __version__
from lorasum.data.sources import Source
from lorasum.io import config_key
from lorasum.study import names
from lorasum.study.tasks.base import Resources, Task, job_cost, task_type

# what the statistics' modules are: the adapters' target modules as `auto` resolves them on the
# base model (the model spec in the key fixes them)
TARGET_MODULES = "auto"


@task_type
class DomainGradientsTask(Task):
    """The mean gradient of ``source``'s training rows at every targeted weight of the base
    model ``model_spec`` and its base loss, written to ``path`` with its key."""

    kind = "gradients"
    domain: str
    source: Source
    model_spec: str
    max_length: int
    path: Path  # <out>/gradients/<domain>

    @property
    def name(self) -> str:
        return names.gradients_name(self.domain)

    @property
    def label(self) -> str:
        return f"gradients {self.domain}"

    def resources(self) -> Resources:
        return Resources(memory_gb=4.0)

    def cost(self) -> float:
        return job_cost("train", len(self.source.splits["train"]), self.max_length)

    def output(self) -> Path:
        return self.path

    def key(self) -> str:
        """The base model, the domain's training rows (their origin and content: the split
        seed and size are in it), the row length and the statistics' definition."""
        from lorasum.analysis.gradients import STATISTICS_VERSION

        return config_key(
            {
                "model": self.model_spec,
                "data": {"origin": self.source.origin, "train": self.source.fingerprint()["train"]},
                "max_length": self.max_length,
                "target_modules": TARGET_MODULES,
                "statistics": STATISTICS_VERSION,
                "version": __version__,
            }
        )

    def statistics(self):
        """The finished statistics (`DomainGradients`, read lazily from ``path``), or None."""
        from lorasum.analysis.gradients import read_gradients

        return read_gradients(self.path, self.key())

    def cached(self) -> dict | None:
        found = self.statistics()
        return None if found is None else _summary(found)

    def run(self, *, model, tokenizer) -> dict:
        """The statistics from the $LORASUM_HOME cache, computed into it where missing, then
        copied into ``path``; a small summary."""
        from lorasum.analysis.gradients import (
            domain_gradients,
            place_gradients,
            target_module_names,
        )

        shapes = target_module_names(model, TARGET_MODULES)
        found = domain_gradients(
            model, tokenizer, self.source, self.max_length, shapes, model_spec=self.model_spec
        )
        return _summary(place_gradients(found, self.path, self.key()))


def _summary(found) -> dict:
    """What the aggregation and the manifest may read: tokens, base loss, where it came from."""
    return {
        "tokens": found.tokens,
        "loss": found.loss,
        "modules": len(found.modules),
        "computed": found.computed,
        "gradient_key": found.info.get("gradient_key"),
    }
