"""`TrainTask`: one adapter of a study (a domain's single adapter or a combination's merged-data
adapter), trained by `lorasum.training.loop.train` into its own directory."""

from __future__ import annotations

from pathlib import Path

from lorasum.data.sources import Source
from lorasum.io import check_output_dir, existing_key, read_json
from lorasum.settings import TrainConfig
from lorasum.study import names
from lorasum.study.tasks.base import AdapterTask, Resources, job_cost, task_type


@task_type
class TrainTask(AdapterTask):
    """``cfg`` on the training rows of ``sources`` (one per domain), written to ``path``; its
    key is known before anything runs (`lorasum.training.loop.adapter_key`)."""

    kind = "train"
    domains: tuple[str, ...]
    cfg: TrainConfig
    sources: tuple[Source, ...]
    path: Path
    overwrite: bool = False
    # under the `steps` budget: the step count a domain's further single adapters are named by
    named_steps: int | None = None

    @property
    def name(self) -> str:
        return names.training_name(self.domains, self.named_steps)

    @property
    def single(self) -> bool:
        return len(self.domains) == 1

    def evaluation_name(self) -> str:
        """What its evaluation is called: ``single-<domain>`` or ``merged-<combination>``."""
        return names.single_eval_name(self.domains[0]) if self.single else self.name

    def snapshot_dir(self, step: int) -> Path:
        """Where the run keeps its adapter at optimizer step ``step``."""
        return self.path / "snapshots" / f"step-{step}"

    def resources(self) -> Resources:
        return Resources(memory_gb=3.0)

    def cost(self) -> float:
        rows = sum(len(s.splits["train"]) for s in self.sources)
        return job_cost("train", rows, self.cfg.max_length)

    def output(self) -> Path:
        return self.path

    def key(self) -> str:
        from lorasum.training.loop import adapter_key

        return adapter_key(self.cfg, list(self.sources))

    def _overwrite(self) -> bool:
        """--overwrite replaces units made with other settings; identical ones are reused."""
        return self.overwrite and existing_key(self.path) != self.key()

    def cached(self) -> dict | None:
        """The finished adapter's marker, or None."""
        if check_output_dir(self.path, self.key(), self._overwrite()):
            return read_json(self.path / "lorasum.json")
        return None

    def run(self, *, model, tokenizer, progress: bool = False) -> dict:
        from lorasum.training.loop import train

        return train(
            self.cfg,
            self.path,
            overwrite=self._overwrite(),
            sources=list(self.sources),
            progress=progress,
            model=model,
            tokenizer=tokenizer,
        )
