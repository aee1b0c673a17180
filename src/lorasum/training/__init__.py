"""Training one LoRA adapter, one module per idea: `loop` (the training run: data, model, steps,
validation, the saved adapter), `schedule` (how long a run goes and when it stops),
`low_memory` (autograd functions that keep less activation memory: LoraBranch, SwiGLU,
RMSNorm, SoftmaxNll, keep_mask), `lora_a` (the ``--lora-a`` policies trained, frozen,
disjoint) and `distributed` (torchrun: the process group and each rank's rows).

``from lorasum.training import train, TrainConfig`` (and the other names of `loop` and
`schedule`) works for users; code inside lorasum imports from the submodule. The names are
resolved on first use, not when the package is imported: `lorasum.evaluate` uses `low_memory`
and `loop` uses `lorasum.evaluate`, so a package that imported `loop` up front would make
``import lorasum.evaluate`` circular.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lorasum.settings import TrainConfig
    from lorasum.training.loop import (
        adapter_key,
        diverged_dir,
        existing_kind,
        load_lora_state,
        load_sources,
        lora_state,
        snapshot_key,
        train,
        validation_loss,
    )
    from lorasum.training.schedule import (
        MIN_VAL_ROWS,
        patience_stop,
        schedule_steps,
        val_rows_problem,
    )

_HOMES = {
    "MIN_VAL_ROWS": "lorasum.training.schedule",
    "TrainConfig": "lorasum.settings",
    "adapter_key": "lorasum.training.loop",
    "diverged_dir": "lorasum.training.loop",
    "existing_kind": "lorasum.training.loop",
    "load_lora_state": "lorasum.training.loop",
    "load_sources": "lorasum.training.loop",
    "lora_state": "lorasum.training.loop",
    "patience_stop": "lorasum.training.schedule",
    "schedule_steps": "lorasum.training.schedule",
    "snapshot_key": "lorasum.training.loop",
    "train": "lorasum.training.loop",
    "val_rows_problem": "lorasum.training.schedule",
    "validation_loss": "lorasum.training.loop",
}

__all__ = [
    "MIN_VAL_ROWS",
    "TrainConfig",
    "adapter_key",
    "diverged_dir",
    "existing_kind",
    "load_lora_state",
    "load_sources",
    "lora_state",
    "patience_stop",
    "schedule_steps",
    "snapshot_key",
    "train",
    "val_rows_problem",
    "validation_loss",
]


def __getattr__(name: str):
    """A re-exported name, imported from its module on first use."""
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value
