"""A study's layout: the resolved settings a plan is built from (`StudyLayout`), which
combinations run (all, or a seeded sample of each order) and where along a training run its
snapshots and validation points lie. Pure functions of the settings; nothing runs."""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, replace
from pathlib import Path

from lorasum.data.sources import Source
from lorasum.methods import get_method
from lorasum.settings import TrainConfig
from lorasum.study.config import STUDY_ONLY_METHODS
from lorasum.training.schedule import schedule_steps


def combinations(names: list[str], max_order: int | None = None) -> list[tuple[str, ...]]:
    """Every combination of 2 … max_order domains (default: up to all of them)."""
    top = len(names) if max_order is None else min(max_order, len(names))
    return [c for k in range(2, top + 1) for c in itertools.combinations(names, k)]


def sample_combinations(combos: list[tuple[str, ...]], k: int, seed: int) -> list[tuple[str, ...]]:
    """``k`` of the combinations of each order (every one of an order that has at most ``k``),
    in their given order; ``k`` = 0 keeps all.

    Each order draws with its own generator, seeded by (``seed``, order), from its combinations
    sorted by their sorted domain names: the choice depends on the domain set, ``k``, ``seed``
    and the order only (not on the order in which domains are listed, the training seeds or
    the other orders present), so a rerun, another training seed or a higher max order keeps it.
    """
    if k <= 0:
        return list(combos)
    kept: set[tuple[str, ...]] = set()
    for order in sorted({len(c) for c in combos}):
        of_order = sorted(tuple(sorted(c)) for c in combos if len(c) == order)
        if len(of_order) > k:
            of_order = random.Random(f"lorasum-sample/{seed}/{order}").sample(of_order, k)
        kept.update(of_order)
    return [c for c in combos if tuple(sorted(c)) in kept]


def order_label(order: int, count: int | None = None) -> str:
    """pairs, triples, or combinations of N (singular when ``count`` is 1)."""
    one = count == 1
    if order == 2:
        return "pair" if one else "pairs"
    if order == 3:
        return "triple" if one else "triples"
    return f"combination{'' if one else 's'} of {order}"


def sample_summary(combos, available, k: int, seed: int) -> dict | None:
    """What results.json records of a sampled study (None when every combination runs): per
    order the combinations available and the ones kept, the totals, and a sentence saying it
    ('sampled 3 of 15 pairs and 3 of 20 triples (--sample 3, seed 0)')."""
    if k <= 0:
        return None
    orders = [
        {
            "order": n,
            "available": sum(len(c) == n for c in available),
            "kept": [list(c) for c in combos if len(c) == n],
        }
        for n in sorted({len(c) for c in available})
    ]
    parts = [
        f"{len(o['kept'])} of {o['available']} {order_label(o['order'], o['available'])}"
        for o in orders
    ]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return {
        "k": k,
        "seed": seed,
        "orders": orders,
        "available": len(available),
        "kept": len(combos),
        "description": f"sampled {text} (--sample {k}, seed {seed})",
    }


@dataclass(frozen=True)
class StudyLayout:
    """What the plan is built from: the resolved study and where its units live."""

    out: Path
    model: str
    names: list[str]
    domain_sources: dict[str, str]
    sources: dict[str, Source]
    base_cfg: TrainConfig
    seeds: list[int]
    seed_per_domain: bool
    combos: list[tuple[str, ...]]
    methods: dict[str, dict]  # every method but the sum, with its options
    variants: list[tuple[tuple[str, ...], tuple[str, ...], str]]  # (combo, pair, third)
    cross_domain: bool
    predictors: bool
    overwrite: bool
    budget: str = "epochs"  # study.config.BUDGETS
    snapshot_epochs: tuple[float, ...] = ()  # epochs along each run; the last is its length
    # with --sample: every combination of the grid (``combos`` is the sample run); None: all run
    available: tuple[tuple[str, ...], ...] | None = None
    sample: int = 0
    sample_seed: int = 0
    routes: tuple[str, ...] = ()  # lorasum.routing.ROUTES compared beside the methods
    merge_aware: bool = False  # singles keep a checkpoint at every validation point
    accuracy: bool = False  # metrics: [perplexity, accuracy]: an accuracy twin of each eval
    equal_params: bool = False  # frozen/disjoint singles at rank 2r, alpha 2α (config.py)

    @property
    def every_combo(self) -> list[tuple[str, ...]]:
        """Every combination of the grid, sampled or not."""
        return list(self.combos if self.available is None else self.available)

    def seed_dir(self, seed: int | None) -> Path:
        return self.out if seed is None else self.out / f"seed-{seed}"

    def test_rows(self, domains) -> int:
        return sum(len(self.sources[d].splits["test"]) for d in domains)

    def train_rows(self, domains) -> int:
        return sum(len(self.sources[d].splits["train"]) for d in domains)

    def merged_steps(self, combo) -> int:
        """Optimizer steps of a combination's merged-data adapter under the epochs schedule."""
        return schedule_steps(self.base_cfg, self.train_rows(combo))[1]

    def single_steps(self, domain: str, combo=None) -> int | None:
        """Which single adapter of ``domain`` ``combo`` composes: None for the domain's own
        (its name is the domain's), else the step count it is named by. Only under the `steps`
        budget has a domain in combinations of several step counts one adapter per count
        (``math@24steps``; the smallest count keeps the domain's own)."""
        if self.budget != "steps" or combo is None:
            return None
        steps = self.merged_steps(combo)
        return None if steps == single_step_counts(self, domain)[0] else steps

    def merged_combos(self) -> list[tuple[str, ...]]:
        """The combinations with a merged-data adapter: every combination run, and the pairs
        of the paper's triple variants (with --sample, a kept triple's pair may be left out
        as a combination; its merged-data adapter is still trained for the variant)."""
        pairs = [pair for _, pair, _ in self.variants if pair not in self.combos]
        return list(self.combos) + list(dict.fromkeys(pairs))

    @property
    def calibrating(self) -> bool:
        return self.predictors or any(
            m not in STUDY_ONLY_METHODS and get_method(m).calibration for m in self.methods
        )


def single_step_counts(lay: StudyLayout, domain: str) -> list[int]:
    """Under the `steps` budget: the distinct step counts of the merged-data adapters of the
    combinations that contain ``domain``, smallest first. Over the whole grid, sampled or not,
    so that a single adapter has the same name (and directory) in both."""
    return sorted({lay.merged_steps(c) for c in lay.every_combo if domain in c})


def snapshot_steps(cfg: TrainConfig, rows: int, epochs: tuple[float, ...]) -> list[int]:
    """The optimizer steps at which a run of ``rows`` training rows is at each of ``epochs``
    (the last entry is the run's end, which is the adapter itself)."""
    return sorted({step_at(cfg, rows, e) for e in epochs[:-1]})


def validation_steps(cfg: TrainConfig, rows: int) -> list[int]:
    """Every step at which a converged run over ``rows`` training rows may be validated (each
    ``eval_every`` steps up to its cap; a run that stops early reaches only some of them)."""
    cap = schedule_steps(cfg, rows)[2]
    return list(range(cfg.eval_every, cap + 1, cfg.eval_every))


def step_at(cfg: TrainConfig, rows: int, epochs: float) -> int:
    """The optimizer step at which a run over ``rows`` training rows has done ``epochs``."""
    return max(1, round(epochs * schedule_steps(cfg, rows)[0]))


def snapshot_methods(lay: StudyLayout) -> list[str]:
    """The methods evaluated at every snapshot: the sum and the data-free methods (those that
    need no calibration statistics of each snapshot)."""
    return ["sum"] + [
        m for m in lay.methods if m not in STUDY_ONLY_METHODS and not get_method(m).calibration
    ]


def lora_a_policy(
    cfg: TrainConfig, doms: tuple[str, ...], names: list[str], equal_params: bool = False
) -> TrainConfig:
    """A single adapter keeps the study's ``lora_a`` (``disjoint``: the domain's index is its
    slot; ``equal_params``: rank 2r and alpha 2α, the scale α/r kept); a merged-data adapter
    is the standard LoRA a user would otherwise train, at the study's rank."""
    if len(doms) > 1:
        return replace(cfg, lora_a="trained", a_slot=0, a_seed=0)
    if equal_params:
        cfg = replace(cfg, rank=2 * cfg.rank, alpha=2 * cfg.alpha)
    if cfg.lora_a == "disjoint":
        return replace(cfg, a_slot=names.index(doms[0]))
    return cfg
