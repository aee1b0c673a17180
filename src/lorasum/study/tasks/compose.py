"""Compositions of a study: `ComposeTask` (a merge method over single adapters, `lorasum.compose`),
`VariantTask` (the paper's triple variant: merged pair + third single, summed) and
`CalibrateTask` (a single adapter's input statistics, which the calibration methods read)."""

from __future__ import annotations

import time
from pathlib import Path

from lorasum.io import existing_key
from lorasum.study import names
from lorasum.study.tasks.base import COMPOSE_COST_ROWS, AdapterTask, Task, job_cost, task_type
from lorasum.study.tasks.train import TrainTask


@task_type
class CalibrateTask(Task):
    """Input statistics of a single adapter on its own training data, cached beside it in
    $LORASUM_HOME/calibration (no output in the study)."""

    kind = "calibrate"
    single: TrainTask

    @property
    def name(self) -> str:
        return names.calibration_name(self.single.name)

    @property
    def label(self) -> str:
        return f"calibrate {self.single.name} seed {self.seed}"

    def dependencies(self) -> tuple[Task, ...]:
        return (self.single,)

    def cost(self) -> float:
        rows = len(self.single.sources[0].splits["train"])
        return job_cost("eval", rows, self.single.cfg.max_length)

    def key(self) -> str:
        from lorasum.analysis.calibration import _plan

        return _plan(self.single.path, None, None, None, None, None, None).key

    def cached(self) -> float | None:
        """0.0 when the statistics are cached (nothing to run), else None."""
        from lorasum.analysis.calibration import _plan

        try:
            found = _plan(self.single.path, None, None, None, None, None, None).cached()
        except (OSError, ValueError):
            return None
        return None if found is None else 0.0

    def run(self, *, model, tokenizer) -> float:
        """The statistics, computed and cached; its seconds."""
        from lorasum.analysis.calibration import calibrate

        t0 = time.perf_counter()
        calibrate(self.single.path, model=model, tokenizer=tokenizer, device=str(model.device))
        return time.perf_counter() - t0


@task_type
class ComposeTask(AdapterTask):
    """``method`` with ``options`` over the adapters in ``paths`` (one per domain of ``combo``:
    the singles' directories, or their snapshots at ``snapshot`` epochs), written to ``out``.
    ``inputs``: the tasks that wrote them, and the calibrations a calibration method reads."""

    kind = "compose"
    combo: tuple[str, ...]
    method: str
    options: dict
    inputs: tuple[Task, ...]
    paths: tuple[Path, ...]
    out: Path
    max_length: int  # the study's row length (the cost's unit)
    overwrite: bool = False
    snapshot: float | None = None

    @property
    def name(self) -> str:
        return names.snapshot_name(self.snapshot, names.composition_name(self.method, self.combo))

    def dependencies(self) -> tuple[Task, ...]:
        return self.inputs

    def cost(self) -> float:
        return job_cost("eval", COMPOSE_COST_ROWS, self.max_length)

    def output(self) -> Path:
        return self.out

    def _config(self):
        from lorasum.methods import MergeConfig

        return MergeConfig(method=self.method, **self.options)

    def key(self) -> str:
        from lorasum.compose import compose_key

        return compose_key(list(self.paths), self._config())

    def cached(self) -> float | None:
        """0.0 when ``out`` holds this composition already, else None."""
        if existing_key(self.out) is None:
            return None
        try:
            key = self.key()
        except (OSError, ValueError):
            return None
        return 0.0 if existing_key(self.out) == key else None

    def run(self, *, model, tokenizer) -> float:
        """The composition (`lorasum.compose.compose`); its seconds."""
        from lorasum.compose import compose

        t0 = time.perf_counter()
        compose(
            list(self.paths),
            self.out,
            overwrite=self.overwrite,
            reuse_same=True,
            config=self._config(),
        )
        return time.perf_counter() - t0


@task_type
class VariantTask(ComposeTask):
    """The sum of the merged-data adapter of ``pair`` and the single adapter of ``third``
    (``combo`` is the triple they cover)."""

    pair: tuple[str, ...]
    third: str

    @property
    def name(self) -> str:
        return names.variant_name(self.pair, self.third)
