"""Routing instead of adding (`lorasum.routing`): one evaluation per combination and route.

`NearestRouteTask` scores each test row with the single adapter whose training-prompt centroid
is nearest, `GaussianRouteTask` the one under whose Gaussian of its first training prompts the
row's prompt is likeliest, `MixtureRouteTask` with the mixture of the adapters its tempered
posterior keeps (summaries cached in ``DIR/routers/``); `ArrowRouteTask` with PEFT's Arrow, a
per-token mix of the singles. The ``oracle`` route needs no task: the singles' own evaluations
give it. Both are written like an evaluation.
"""

from __future__ import annotations

from pathlib import Path

from lorasum._version import __version__
from lorasum.data.sources import Source
from lorasum.io import config_key, sha256_file, write_json
from lorasum.models.precision import autocast_dtype
from lorasum.settings import TrainConfig
from lorasum.study import names
from lorasum.study.tasks.base import EVAL_BATCH_SIZE, Task, job_cost, task_type
from lorasum.study.tasks.evaluate import ScoredTask, eval_key
from lorasum.study.tasks.train import TrainTask

# A prompt-level router's summary of one domain, by route: (its key's name, its file's suffix
# in routers/, the tensor's name in it). ``nearest``'s are the names older studies wrote.
ROUTER_SUMMARIES = {
    "nearest": ("prompt-centroid", "", "centroid"),
    "gaussian": ("prompt-gaussian", "-gaussian", "gaussian"),
}
# The summary each prompt-level route reads (``mixture`` soft-routes on ``gaussian``'s).
ROUTER_OF = {"nearest": "nearest", "gaussian": "gaussian", "mixture": "gaussian"}


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
    routers: Path,
    domain: str,
    source: Source,
    cfg: TrainConfig,
    *,
    model,
    tokenizer,
    router: str = "nearest",
):
    """The domain's router summary — ``nearest``: `routing.prompt_centroid` of its training
    prompts; ``gaussian``: `routing.prompt_gaussian` of its first ones — cached in
    ``routers/<domain>[-gaussian].safetensors`` (with its key; written atomically, recomputed
    when the key differs or the file is unreadable). Not a task's output, so the ledger never
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
    summary = build(
        model,
        tokenizer,
        source,
        cfg.max_length,
        split="train",
        amp_dtype=autocast_dtype(cfg.precision, device),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(path, ".safetensors")
    save_file({tensor: summary.contiguous()}, tmp, metadata={"key": key})
    commit_temp(tmp, path)
    return summary


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
    """Every test row scored by the single adapter its prompt routes to: hard top-1 on each
    domain's training-prompt centroid, cached in ``routers`` (`router_summary`)."""

    route = "nearest"
    routers: Path

    @property
    def router(self) -> str:
        """The router summary this route reads (`ROUTER_OF`)."""
        return ROUTER_OF[self.route]

    @property
    def options(self) -> dict:
        """The route's own settings, in its key (none for the hard routes: older keys kept)."""
        return {}

    def prompts(self) -> int:
        """Training prompts the domains' summaries read (once per domain, then cached)."""
        return sum(len(self.sources[d].splits["train"]) for d in self.domains)

    def cost(self) -> float:
        # scoring the test rows, plus (once per domain, then cached) its training prompts
        return job_cost("eval", self.test_rows() * 2 + self.prompts() // 3, self.cfg.max_length)

    def key(self) -> str:
        weights = [sha256_file(p / "adapter_model.safetensors") for _, p in self.adapters]
        unit = config_key(
            {
                "route": self.route,
                "adapters": weights,
                "routers": [
                    router_key(self.sources[d], self.cfg, self.router) for d in self.domains
                ],
                **self.options,
            }
        )
        return eval_key(unit, self.domains, self.sources, self.cfg)

    def run(self, *, model, tokenizer) -> dict:
        """`routing.evaluate_routed` on the cached summaries, with ``router_tokens``: the
        prompt tokens each domain's summary read forward (once per study, shared by every
        combination the domain is in)."""
        import torch

        from lorasum.routing import GAUSSIAN_PROMPTS, router_tokens

        key, cfg = self.key(), self.cfg
        summaries = torch.stack(
            [
                router_summary(
                    self.routers,
                    d,
                    self.sources[d],
                    cfg,
                    model=model,
                    tokenizer=tokenizer,
                    router=self.router,
                )
                for d in self.domains
            ]
        )  # nearest (K, H), gaussian (K, 2, H)
        device = next(model.parameters()).device
        result = self.evaluate(
            summaries,
            model=model,
            tokenizer=tokenizer,
            adapters=dict(self.adapters),
            sources={d: self.sources[d] for d in self.domains},
            max_length=cfg.max_length,
            answer_only=cfg.answer_only,
            batch_size=EVAL_BATCH_SIZE,
            amp_dtype=autocast_dtype(cfg.precision, device),
        )
        prompts = GAUSSIAN_PROMPTS if self.router == "gaussian" else None
        result["router_tokens"] = {
            d: router_tokens(tokenizer, self.sources[d], cfg.max_length, prompts)
            for d in self.domains
        }
        write_json(self.path, {"key": key, "result": result})
        return result

    def evaluate(self, summaries, **kwargs) -> dict:
        """`routing.evaluate_routed` against the centroids (hard top-1 by cosine)."""
        from lorasum.routing import evaluate_routed

        return evaluate_routed(centroids=summaries, **kwargs)


@task_type
class GaussianRouteTask(NearestRouteTask):
    """As `NearestRouteTask`, with each domain's diagonal Gaussian of its first
    `routing.GAUSSIAN_PROMPTS` training prompts (``routers/<domain>-gaussian.safetensors``)
    and the likeliest adapter."""

    route = "gaussian"

    def prompts(self) -> int:
        from lorasum.routing import GAUSSIAN_PROMPTS

        return min(super().prompts(), GAUSSIAN_PROMPTS * len(self.domains))

    def evaluate(self, summaries, **kwargs) -> dict:
        """`routing.evaluate_routed` against the Gaussians (hard top-1 by likelihood)."""
        from lorasum.routing import evaluate_routed

        return evaluate_routed(gaussians=summaries, **kwargs)


@task_type
class MixtureRouteTask(GaussianRouteTask):
    """As `GaussianRouteTask`'s summaries, scored soft: each row by the mixture of the adapters
    its tempered posterior keeps (`routing.evaluate_mixture`)."""

    route = "mixture"

    @property
    def options(self) -> dict:
        from lorasum.routing import MIXTURE_FLOOR, MIXTURE_TEMPERATURE

        return {"temperature": MIXTURE_TEMPERATURE, "floor": MIXTURE_FLOOR}

    def cost(self) -> float:
        # every adapter on a row at worst, plus the summaries' prompts (once per domain)
        rows = self.test_rows() * (1 + len(self.domains))
        return job_cost("eval", rows + self.prompts() // 3, self.cfg.max_length)

    def evaluate(self, summaries, **kwargs) -> dict:
        """`routing.evaluate_mixture` on the Gaussians with the route's options."""
        from lorasum.routing import evaluate_mixture

        return evaluate_mixture(gaussians=summaries, **self.options, **kwargs)


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
            model,
            tokenizer,
            dict(self.adapters),
            {d: self.sources[d] for d in self.domains},
            cfg.max_length,
            answer_only=cfg.answer_only,
            batch_size=EVAL_BATCH_SIZE,
            amp_dtype=autocast_dtype(cfg.precision, device),
            top_k=options["top_k"],
            temperature=options["router_temperature"],
            rng_seed=options["rng_seed"],
        )
        write_json(self.path, {"key": key, "result": result})
        return result


ROUTE_TASKS: dict[str, type[RouteTask]] = {
    "nearest": NearestRouteTask,
    "gaussian": GaussianRouteTask,
    "mixture": MixtureRouteTask,
    "arrow": ArrowRouteTask,
}
