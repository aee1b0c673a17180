"""How long a training run goes and when it stops: the LR schedule's length and the latest
step (`schedule_steps`), the patience rule on the validation curve (`patience_stop`), and whether
a validation split is large enough to stop on (`val_rows_problem`). Pure functions of the
settings and the rows: the study plans with them before anything trains.
"""

from __future__ import annotations

import math

from lorasum.data.sources import Source
from lorasum.errors import raise_all
from lorasum.settings import TrainConfig

# The fewest validation rows a patience stop may be decided on (docs/BUDGETS.md): two batches
# of the default batch size, so that one row moves the mean loss by at most 1/16 of its own
# deviation and a stop is not the verdict of a handful of rows.
MIN_VAL_ROWS = 16


def schedule_steps(cfg: TrainConfig, train_rows: int) -> tuple[int, int, int]:
    """(steps per epoch, steps of the LR schedule, the step the run stops at at the latest)."""
    steps_per_epoch = math.ceil(train_rows / cfg.batch_size)
    if cfg.eval_every > 0 and cfg.max_epochs > 0:
        total_steps = max(1, math.ceil(cfg.max_epochs * steps_per_epoch))
    else:
        total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    problems = []
    if cfg.stop_at > total_steps:
        problems.append(f"--stop-at {cfg.stop_at} is beyond the run's {total_steps} steps")
    late = [s for s in cfg.snapshots if s > total_steps]
    if late:
        problems.append(f"--snapshots {late} are beyond the run's {total_steps} steps")
    raise_all(problems, f"{train_rows} training rows / batch {cfg.batch_size}")
    return steps_per_epoch, total_steps, cfg.stop_at or total_steps


def patience_stop(val_losses: list[float], patience: int) -> tuple[int, int | None]:
    """Early stopping on a validation curve: (index of the best loss, index to stop at or None).

    The best is the lowest loss, the earlier one on ties (NaN counts as +inf); the run stops at
    the first evaluation that is the ``patience``-th in a row not lower than the best so far.
    """
    best, stop = 0, None
    for i, loss in enumerate(val_losses):
        if _finite_or_inf(loss) < _finite_or_inf(val_losses[best]):
            best = i
        elif i - best >= patience:
            stop = i
            break
    return best, stop


def _finite_or_inf(x: float) -> float:
    return x if not math.isnan(x) else math.inf


def val_rows_problem(cfg: TrainConfig, sources: list[Source]) -> str | None:
    """Why ``sources``' validation split is too small to stop on (``cfg.eval_every`` > 0), or
    None: patience stopping needs at least ``MIN_VAL_ROWS`` rows (their union, when merged)."""
    n = sum(len(s.splits["val"]) for s in sources)
    if cfg.eval_every == 0 or n >= MIN_VAL_ROWS:
        return None
    names = "+".join(s.name for s in sources)
    capped = f", capped by --max-eval {cfg.max_eval}" if cfg.max_eval is not None else ""
    return (
        f"--eval-every stops on the validation loss, which needs at least {MIN_VAL_ROWS} "
        f"validation rows; {names} has {n} (its 10 % validation split{capped}): use more data, "
        "raise --max-eval, or train without --eval-every (a study: without --budget converged)"
    )
