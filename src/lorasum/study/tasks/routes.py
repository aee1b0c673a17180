"""Routing instead of adding (`lorasum.routing`): one evaluation per combination and route.

`NearestRouteTask` scores each test row with the single adapter whose training-prompt centroid
is nearest (centroids cached in ``DIR/routers/``); `ArrowRouteTask` with PEFT's Arrow, a
per-token mix of the singles. The ``oracle`` route needs no task: the singles' own evaluations
give it. Both are written like an evaluation.
"""

from __future__ import annotations

from pathlib import Path

from lorasum._version import __version__
from lorasum.data import Source
from lorasum.io import config_key, write_json
from lorasum.models import autocast_dtype, sha256_file
from lorasum.study import names
from lorasum.study.tasks.base import EVAL_BATCH_SIZE, Task, job_cost, task_type
from lorasum.study.tasks.evaluate import ScoredTask, eval_key
from lorasum.study.tasks.train import TrainTask
from lorasum.train import TrainConfig


def router_key(source: Source, cfg: TrainConfig) -> str:
    """What a domain's router centroid depends on (beside the study's base model): its
    training rows, how prompts are cut, the precision."""
    return config_key(
        {
            "router": "prompt-centroid",
            "train": source.fingerprint()["train"],
            "max_length": cfg.max_length,
            "precision": cfg.precision,
            "version": __version__,
        }
    )


def router_centroid(path: Path, source: Source, cfg: TrainConfig, *, model, tokenizer):
    """The domain's centroid (`routing.prompt_centroid` of its own training prompts), cached
    in ``path`` (a safetensors file with its key; written atomically, recomputed when the key
    differs or the file is unreadable). Not a unit's output, so the ledger never reads it."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file, save_file

    from lorasum.io import commit_temp, temp_beside
    from lorasum.routing import prompt_centroid

    key = router_key(source, cfg)
    try:
        with safe_open(str(path), "pt") as f:
            if (f.metadata() or {}).get("key") == key:
                return load_file(str(path))["centroid"]
    except (OSError, SafetensorError):
        pass
    device = next(model.parameters()).device
    centroid = prompt_centroid(model, tokenizer, source, cfg.max_length, split="train",
                               amp_dtype=autocast_dtype(cfg.precision, device))  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(path, ".safetensors")
    save_file({"centroid": centroid.contiguous()}, tmp, metadata={"key": key})
    commit_temp(tmp, path)
    return centroid


@task_type
class RouteTask(ScoredTask):
    """A route of one combination (``domains``, in its order) over its ``singles``, the single
    adapters' trainings in the same order."""

    route = ""  # lorasum.routing.ROUTES
    singles: tuple[TrainTask, ...]

    @property
    def name(self) -> str:
        return names.route_name(self.route, self.domains)

    @property
    def adapters(self) -> tuple[tuple[str, Path], ...]:
        """(domain, single adapter dir) in the combination's order."""
        return tuple((d, t.path) for d, t in zip(self.domains, self.singles, strict=True))

    def dependencies(self) -> tuple[Task, ...]:
        return self.singles


@task_type
class NearestRouteTask(RouteTask):
    """Every test row scored by the single adapter its prompt routes to (hard top-1 on the
    centroids cached as ``routers/<domain>.safetensors``)."""

    route = "nearest"
    routers: Path

    def cost(self) -> float:
        # scoring the test rows, plus (once per domain, then cached) its training prompts
        train_rows = sum(len(self.sources[d].splits["train"]) for d in self.domains)
        return job_cost("eval", self.test_rows() * 2 + train_rows // 3, self.cfg.max_length)

    def key(self) -> str:
        weights = [sha256_file(p / "adapter_model.safetensors") for _, p in self.adapters]
        unit = config_key(
            {"route": "nearest", "adapters": weights,
             "routers": [router_key(self.sources[d], self.cfg) for d in self.domains]}
        )  # fmt: skip
        return eval_key(unit, self.domains, self.sources, self.cfg)

    def run(self, *, model, tokenizer) -> dict:
        """`routing.evaluate_routed` on the cached centroids."""
        import torch

        from lorasum.routing import evaluate_routed

        key, cfg = self.key(), self.cfg
        centroids = torch.stack(
            [router_centroid(self.routers / f"{d}.safetensors", self.sources[d], cfg,
                             model=model, tokenizer=tokenizer) for d in self.domains]
        )  # (K, H)  # fmt: skip
        device = next(model.parameters()).device
        result = evaluate_routed(
            model, tokenizer, dict(self.adapters), {d: self.sources[d] for d in self.domains},
            cfg.max_length, centroids=centroids, answer_only=cfg.answer_only,
            batch_size=EVAL_BATCH_SIZE, amp_dtype=autocast_dtype(cfg.precision, device),
        )  # fmt: skip
        write_json(self.path, {"key": key, "result": result})
        return result


@task_type
class ArrowRouteTask(RouteTask):
    """PEFT's Arrow over the singles, with `routing.arrow_options` for their number (top_k =
    all of them)."""

    route = "arrow"

    @property
    def options(self) -> dict:
        from lorasum.routing import arrow_options

        return arrow_options(len(self.singles))

    def cost(self) -> float:
        return job_cost("eval", self.test_rows() * 2, self.cfg.max_length)  # every adapter

    def key(self) -> str:
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
        return eval_key(unit, self.domains, self.sources, self.cfg)

    def run(self, *, model, tokenizer) -> dict:
        """`routing.evaluate_arrow` over the singles."""
        from lorasum.routing import evaluate_arrow

        key, cfg, options = self.key(), self.cfg, self.options
        device = next(model.parameters()).device
        result = evaluate_arrow(
            model, tokenizer, dict(self.adapters), {d: self.sources[d] for d in self.domains},
            cfg.max_length, answer_only=cfg.answer_only, batch_size=EVAL_BATCH_SIZE,
            amp_dtype=autocast_dtype(cfg.precision, device), top_k=options["top_k"],
            temperature=options["router_temperature"], rng_seed=options["rng_seed"],
        )  # fmt: skip
        write_json(self.path, {"key": key, "result": result})
        return result


ROUTE_TASKS: dict[str, type[RouteTask]] = {"nearest": NearestRouteTask, "arrow": ArrowRouteTask}
