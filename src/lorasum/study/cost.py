"""What a study grid costs: its units per kind and its tokens, in closed form, and a projection
of GPU-hours and wall time for a base model of P parameters on G GPUs.

The counts are those `study.plan.plan_study` makes (tests/test_cost.py checks them against it):
for N domains, combinations of orders 2 … K, S seeds and M methods besides the sum,

    C = Σ_{k=2..min(K,N)} C(N, k)            combinations (each: a merged-data adapter, a sum)
    V = 3 · C(N, 3) if paper_variants and K ≥ 3 (merged pair + third single, summed)
    A = N (epochs, converged) or N · D (steps: one single per distinct merged step count D)

per seed: A + C trainings; 1 + N + 2C + V + M·C evaluations (+1 for the base model, once);
C + V + (M − [calibrated]) · C compositions; C fits of `calibrated`; A calibrations where a
method or the predictors need them; one predictors unit; with the predictors, once per study,
N gradients units (one per domain) and the unit of the data's predictors that compares them;
snapshots add
per extra snapshot epoch C merged evaluations and C compositions + C evaluations per data-free
method (and the sum).

Tokens assume equal rows per domain (train r, test t) and a mean of ℓ tokens per row (at
most max_length); a training of R rows for E epochs processes R·E rows, a single adapter under
the `steps` budget the rows of its s steps (cycling through its r rows).

The projection turns tokens into FLOPs with a per-token rule and a hardware peak times a model
FLOP utilisation (MFU); see `projection` and docs/SCALE.md for where each figure comes from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lorasum.analysis.gradients import DEFAULT_MAX_BYTES
from lorasum.study.config import STUDY_ONLY_METHODS
from lorasum.study.tasks import KINDS


@dataclass(frozen=True)
class Grid:
    """A study's shape: what its unit and token counts depend on."""

    domains: int  # N
    max_order: int | None = None  # K (None: every order up to N)
    seeds: int = 1  # S
    methods: tuple[str, ...] = ()  # besides the sum (which every study runs)
    cross_domain: bool = True
    paper_variants: bool = True
    predictors: bool = True
    budget: str = "epochs"  # study.config.BUDGETS
    snapshots: int = 0  # snapshot epochs including the run's last (0: none)
    train_rows: int = 64  # r: training rows per domain
    test_rows: int = 24  # t: test rows per domain
    batch_size: int = 8
    epochs: float = 1.0
    calibrated_fraction: float = STUDY_ONLY_METHODS["calibrated"]["fraction"]
    learned_rows: int = STUDY_ONLY_METHODS["learned"]["rows"]  # per domain, each epoch
    learned_epochs: int = STUDY_ONLY_METHODS["learned"]["epochs"]

    @property
    def top_order(self) -> int:
        return self.domains if self.max_order is None else min(self.max_order, self.domains)

    def combinations(self, order: int | None = None) -> int:
        """C: combinations of 2 … K domains (or of exactly ``order``)."""
        orders = [order] if order is not None else range(2, self.top_order + 1)
        return sum(math.comb(self.domains, k) for k in orders if 2 <= k <= self.top_order)

    def variants(self) -> int:
        triples = self.paper_variants and (self.max_order is None or self.max_order >= 3)
        return 3 * self.combinations(3) if triples else 0

    def methods_beside_sum(self) -> list[str]:
        return [m for m in dict.fromkeys(self.methods) if m != "sum"]


def calibrates(method: str) -> bool:
    """Whether a method needs each single adapter's input statistics (a calibrate unit)."""
    from lorasum.methods import get_method

    return method not in STUDY_ONLY_METHODS and bool(get_method(method).calibration)


def merged_steps(grid: Grid, order: int) -> int:
    """Optimizer steps of an order-``order`` merged-data adapter (epochs schedule, as
    `lorasum.training.schedule.schedule_steps`)."""
    return max(1, math.ceil(grid.epochs * math.ceil(order * grid.train_rows / grid.batch_size)))


def single_step_counts(grid: Grid) -> list[int]:
    """Under `steps`: the distinct step counts a domain's single adapters train for."""
    return sorted({merged_steps(grid, k) for k in range(2, grid.top_order + 1)})


def single_adapters(grid: Grid) -> int:
    """A: single adapters per seed (under `steps` one per distinct step count and domain)."""
    if grid.budget == "steps" and grid.top_order >= 2:
        return grid.domains * len(single_step_counts(grid))
    return grid.domains


def snapshot_method_count(grid: Grid) -> int:
    """Methods composed at every snapshot: the sum and the data-free methods."""
    others = [m for m in grid.methods_beside_sum() if m not in STUDY_ONLY_METHODS]
    return 1 + sum(not calibrates(m) for m in others)


def unit_counts(grid: Grid) -> dict[str, int]:
    """Units per kind (`study.tasks.KINDS`) of the whole study, every seed."""
    n, s, c, v = grid.domains, grid.seeds, grid.combinations(), grid.variants()
    methods = grid.methods_beside_sum()
    fitted = sum(m in STUDY_ONLY_METHODS for m in methods)
    calibrating = grid.predictors or any(calibrates(m) for m in methods)
    extra = max(0, grid.snapshots - 1)  # snapshot epochs before the run's end
    snap_m = snapshot_method_count(grid)
    per_seed = {
        "train": single_adapters(grid) + c,
        "eval": n + 2 * c + v + len(methods) * c + extra * c * (1 + snap_m),
        "calibrate": single_adapters(grid) if calibrating else 0,
        "compose": c + v + (len(methods) - fitted) * c + extra * c * snap_m,
        "fit": fitted * c,
        "predictors": int(grid.predictors),
    }
    # the base model's evaluation; each domain's gradients and the data's predictors
    once = {"eval": 1, "gradients": n * grid.predictors, "predictors": int(grid.predictors)}
    counts = {k: per_seed.get(k, 0) * s + once.get(k, 0) for k in KINDS}
    return {k: v for k, v in counts.items() if v}


def rows_seen(rows: int, batch: int, steps: int) -> int:
    """Training rows processed by ``steps`` optimizer steps cycling through ``rows`` rows in
    batches of ``batch`` (exact where ``batch`` divides ``rows``, else an upper bound)."""
    per_epoch = math.ceil(rows / batch)
    full, rest = divmod(steps, per_epoch)
    return full * rows + min(rows, rest * batch)


def train_rows(grid: Grid) -> list[tuple[int, int]]:
    """(rows one training processes, how many such trainings) over the whole study."""
    r, s = grid.train_rows, grid.seeds
    if grid.budget == "steps" and grid.top_order >= 2:
        singles = [
            (rows_seen(r, grid.batch_size, st), grid.domains) for st in single_step_counts(grid)
        ]
    else:
        singles = [(round(r * grid.epochs), grid.domains)]
    merged = [
        (round(k * r * grid.epochs), grid.combinations(k)) for k in range(2, grid.top_order + 1)
    ]
    return [(rows, count * s) for rows, count in singles + merged if count]


def eval_rows(grid: Grid) -> list[tuple[int, int]]:
    """(test rows one evaluation reads, how many such evaluations) over the whole study."""
    n, t, s = grid.domains, grid.test_rows, grid.seeds
    methods = grid.methods_beside_sum()
    extra = max(0, grid.snapshots - 1)
    out = [(n * t, 1), ((n if grid.cross_domain else 1) * t, n * s)]  # base; singles
    for k in range(2, grid.top_order + 1):
        per_combo = 2 + len(methods) + extra * (1 + snapshot_method_count(grid))
        out.append((k * t, grid.combinations(k) * per_combo * s))
    if grid.variants():
        out.append((3 * t, grid.variants() * s))
    return [(rows, count) for rows, count in out if count]


def token_counts(grid: Grid, tokens_per_row: float) -> dict[str, dict[str, float]]:
    """Per kind: the tokens it processes in all ({"total", "largest"} unit) with ℓ =
    ``tokens_per_row``. Trainings are forward + backward; evaluations, calibrations and fits
    forward only. A calibration reads its domain's training rows, once per domain (the
    statistics are cached per domain: the other seeds' and step counts' calibrate units read
    the cache); fits read at most
    ``calibrated_fraction`` of their merged-data training's tokens; a gradients unit takes one
    gradient over its domain's training rows. Compositions and predictors (which compare saved
    statistics) process no tokens."""
    counts = unit_counts(grid)
    out: dict[str, dict[str, float]] = {}
    for kind, rows in (("train", train_rows(grid)), ("eval", eval_rows(grid))):
        out[kind] = {
            "total": sum(r * c for r, c in rows) * tokens_per_row,
            "largest": max(r for r, _ in rows) * tokens_per_row,
        }
    per_domain = grid.train_rows * tokens_per_row
    if counts.get("calibrate"):  # once per domain: cached across seeds, budgets and studies
        out["calibrate"] = {"total": grid.domains * per_domain, "largest": per_domain}
    if counts.get("fit"):
        orders = range(2, grid.top_order + 1)
        fitted = set(grid.methods_beside_sum())
        per_combo = []  # (tokens of one fit of a combination of k domains, combinations)
        if "calibrated" in fitted:  # a share of the merged-data training's tokens
            share = tokens_per_row * grid.calibrated_fraction
            per_combo += [
                (k * grid.train_rows * grid.epochs * share, grid.combinations(k)) for k in orders
            ]
        if "learned" in fitted:  # K validation rows of each domain, every epoch
            rows = min(grid.learned_rows, grid.test_rows)  # val and test: 10 % each, one cap
            per_combo += [
                (k * rows * grid.learned_epochs * tokens_per_row, grid.combinations(k))
                for k in orders
            ]
        total = sum(t * c for t, c in per_combo) * grid.seeds
        out["fit"] = {"total": total, "largest": max(t for t, _ in per_combo)}
    if counts.get("gradients"):  # one unit per domain
        out["gradients"] = {"total": grid.domains * per_domain, "largest": per_domain}
    return out


@dataclass(frozen=True)
class Hardware:
    """One accelerator: peak dense throughput and the share of it a unit reaches (MFU)."""

    name: str = "H100 SXM"
    peak_bf16: float = 989e12  # FLOP/s, dense BF16 Tensor Core (NVIDIA H100 datasheet)
    peak_fp32: float = 67e12  # FLOP/s, FP32 (same datasheet; TF32 Tensor Core is off in torch)
    peak_fp64: float = 67e12  # FLOP/s, FP64 Tensor Core (same datasheet)
    mfu: float = 0.40


@dataclass(frozen=True)
class Model:
    """A base model's size for the per-token FLOP rules."""

    name: str = "Llama-2-7B"
    params: float = 6.7e9  # P (non-embedding parameters dominate)
    layers: int = 32
    d_model: int = 4096
    d_ff: int = 11008
    train_flops: float = 4.0  # per parameter per token: LoRA (2P forward + 2P input-gradient)

    def target_params(self) -> float:
        """Weights of the adapted modules of a Llama block (q, k, v, o: d×d; down: d_ff×d)."""
        return self.layers * (4 * self.d_model**2 + self.d_model * self.d_ff)

    def gradient_flops(self, max_bytes: int) -> float:
        """FLOP per token of a gradients unit (`lorasum.analysis.gradients`): one forward +
        activation-gradient backward (4P) per module group whose fp32 sums fit ``max_bytes``
        (at least ⌈4·target_params / max_bytes⌉ groups), plus each module's δᵀx (2 FLOP per
        adapted weight)."""
        passes = max(1, math.ceil(4 * self.target_params() / max_bytes))
        return passes * 4.0 * self.params + 2.0 * self.target_params()

    def gram_flops(self) -> float:
        """FP64 FLOP per token of a calibration's input Gram matrices Σ x xᵀ at the adapted
        modules of a Llama block (q/k/v share one input of d_model, o_proj d_model, down_proj
        d_ff): 2·d² per distinct input and token."""
        return self.layers * 2.0 * (2 * self.d_model**2 + self.d_ff**2)


# Units that run the base model as loaded (fp32 weights, no autocast): calibrations (the
# statistics are fp32 forward passes) and the domains' gradients (fp32).
FP32_KINDS = ("calibrate", "gradients")
# Units that process no tokens: they read saved factors or statistics (`projection` gives
# each a fixed number of seconds).
TOKENLESS_KINDS = ("compose", "predictors")


def kind_seconds(
    kind: str, tokens: float, model: Model, hw: Hardware, max_bytes: int = DEFAULT_MAX_BYTES
) -> float:
    """GPU-seconds of ``tokens`` processed by a unit of ``kind``: its model FLOPs at the BF16
    peak (FP32 for `FP32_KINDS`), plus a calibration's FP64 Gram products at the FP64 peak.
    ``max_bytes``: the gradients units' memory bound per module group."""
    flops = {
        "train": model.train_flops * model.params,
        "gradients": model.gradient_flops(max_bytes),
    }
    peak = hw.peak_fp32 if kind in FP32_KINDS else hw.peak_bf16
    seconds = tokens * flops.get(kind, 2.0 * model.params) / (peak * hw.mfu)
    if kind == "calibrate":
        seconds += tokens * model.gram_flops() / (hw.peak_fp64 * hw.mfu)
    return seconds


PHASES = (("train", "gradients"), ("calibrate",), ("compose", "fit", "eval", "predictors"))


def projection(
    grid: Grid,
    tokens_per_row: float,
    gpus: int,
    model: Model = Model(),
    hw: Hardware = Hardware(),
    compose_seconds: float = 10.0,
    gradient_max_bytes: int = DEFAULT_MAX_BYTES,
) -> dict:
    """GPU-hours per kind and wall hours on ``gpus`` GPUs (one unit per GPU at a time).

    Wall time follows the dependencies: trainings and the domains' gradients first, then the
    calibrations, then compositions, fits, evaluations and predictors; units of one phase are
    independent, so a phase takes max(its GPU-seconds / G, its longest unit) — the ideal list
    schedule (Graham's bound adds at most one longest unit per phase). ``compose_seconds``:
    seconds of one composition (LoRA factors only; no tokens), an assumption, also taken for
    a predictors unit (it compares saved statistics); ``gradient_max_bytes``: the gradients
    units' bound on one module group's gradient sums (the study's default today)."""
    counts = unit_counts(grid)
    tokens = token_counts(grid, tokens_per_row)
    gpu_s, longest = {}, {}
    for kind, n in counts.items():
        if kind in TOKENLESS_KINDS:
            gpu_s[kind], longest[kind] = n * compose_seconds, compose_seconds
        else:
            t = tokens[kind]
            gpu_s[kind] = kind_seconds(kind, t["total"], model, hw, gradient_max_bytes)
            longest[kind] = kind_seconds(kind, t["largest"], model, hw, gradient_max_bytes)
    wall = 0.0
    for phase in PHASES:
        kinds = [k for k in phase if k in counts]
        if kinds:
            work = sum(gpu_s[k] for k in kinds)
            wall += max(work / gpus, max(longest[k] for k in kinds))
    return {
        "units": counts,
        "tokens": {k: v["total"] for k, v in tokens.items()},
        "gpu_hours": {k: v / 3600 for k, v in gpu_s.items()},
        "gpu_hours_total": sum(gpu_s.values()) / 3600,
        "longest_unit_hours": {k: v / 3600 for k, v in longest.items()},
        "gpus": gpus,
        "wall_hours": wall / 3600,
    }
