"""`EvalTask`: perplexity of the base model, or of it with one adapter, on the test rows of some
domains, written to ``evals/<name>.json`` with its key."""

from __future__ import annotations

from pathlib import Path

from lorasum._version import __version__
from lorasum.data.sources import Source
from lorasum.data.token_cache import tokenize_cached
from lorasum.data.tokenize import make_batches
from lorasum.io import config_key, read_json, sha256_file, write_json
from lorasum.models.precision import autocast_dtype
from lorasum.settings import TrainConfig
from lorasum.study import names
from lorasum.study.tasks.base import EVAL_BATCH_SIZE, AdapterTask, Task, job_cost, task_type


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
    """The result in ``path`` when it was written with ``key``, else None."""
    cached = read_json_or_none(path)
    return cached["result"] if cached is not None and cached.get("key") == key else None


@task_type
class ScoredTask(Task):
    """A task that scores test rows and writes ``{"key", "result"}`` to
    ``<seed_dir>/evals/<name>.json``: found finished when that file holds its key."""

    kind = "eval"
    domains: tuple[str, ...]
    sources: dict[str, Source]  # every domain of the study
    cfg: TrainConfig  # the study's: max_length, answer_only, precision
    seed_dir: Path  # the seed's directory (the study's for seed-independent ones)

    @property
    def path(self) -> Path:
        return self.seed_dir / "evals" / f"{self.name}.json"

    def output(self) -> Path:
        return self.path

    def cached(self) -> dict | None:
        try:
            return cached_eval(self.path, self.key())
        except OSError:  # the adapter is not there yet
            return None

    def test_rows(self) -> int:
        return sum(len(self.sources[d].splits["test"]) for d in self.domains)


@task_type
class EvalTask(ScoredTask):
    """Perplexity of ``adapter`` (the task that wrote it; None: the base model) on the test rows
    of ``domains``. ``adapter_dir``: where its weights lie (the adapter's output, or one of a
    training's snapshots, at ``snapshot`` epochs); ``unit_key`` None: the weights file's sha256
    is the key's unit."""

    adapter: AdapterTask | None
    adapter_dir: Path | None
    snapshot: float | None = None
    unit_key: str | None = None

    @property
    def name(self) -> str:
        if self.adapter is None:
            return names.BASE
        return names.snapshot_name(self.snapshot, self.adapter.evaluation_name())

    @property
    def label(self) -> str:
        return f"eval {self.name}"

    def dependencies(self) -> tuple[Task, ...]:
        return () if self.adapter is None else (self.adapter,)

    def cost(self) -> float:
        return job_cost("eval", self.test_rows(), self.cfg.max_length)

    def weights_key(self) -> str:
        """The ``unit`` of the key: given, or the adapter's weights file's sha256."""
        if self.unit_key is not None:
            return self.unit_key
        return sha256_file(self.adapter_dir / "adapter_model.safetensors")

    def key(self) -> str:
        return eval_key(self.weights_key(), self.domains, self.sources, self.cfg)

    def run(self, *, model, tokenizer, progress: bool = False) -> dict:
        """Perplexity on the test splits, written atomically to ``path`` with its key. The
        shared ``model`` is left unchanged."""
        from lorasum.evaluate import evaluate_batches

        key = self.key()
        device = next(model.parameters()).device
        srcs = [self.sources[d] for d in self.domains]
        items = tokenize_cached(tokenizer, srcs, "test", self.cfg.max_length, self.cfg.answer_only)
        batches = make_batches(items, EVAL_BATCH_SIZE, tokenizer.pad_token_id, shuffle=False)
        net = model
        if self.adapter_dir is not None:
            from peft import PeftModel

            net = PeftModel.from_pretrained(model, str(self.adapter_dir))
        try:
            result = evaluate_batches(
                net,
                batches,
                list(self.domains),
                device,
                autocast_dtype(self.cfg.precision, device),
                progress=progress,
                desc=f"eval {self.path.stem}",
            )
        finally:
            if self.adapter_dir is not None:
                net.unload()
        write_json(self.path, {"key": key, "result": result})
        return result
