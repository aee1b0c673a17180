"""One adapter on several processes: torchrun's environment, the process group, the row shares.

``torchrun --nproc_per_node N -m lorasum.cli train ...`` starts N processes with ``WORLD_SIZE``,
``RANK`` and ``LOCAL_RANK`` set; ``train`` reads them here, joins one process group (gloo on
CPUs, NCCL on GPUs, rank k on ``cuda:LOCAL_RANK``) and gives each rank its share of every global
batch. Without those variables (or with ``WORLD_SIZE=1``) everything here is a no-op: one process
trains as it always did.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from lorasum.errors import LorasumError

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place among the processes that train one adapter together."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes the adapter and its log."""
        return self.rank == 0

    def share(self, value: T) -> T:
        """Rank 0's ``value`` on every rank (a picklable object); itself in one process."""
        if not self.distributed:
            return value
        box = [value if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def sum(self, values: Sequence[float], device: torch.device) -> list[float]:
        """The sums over ranks of ``values`` (float64, one all-reduce); themselves in one process."""
        if not self.distributed:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)  # (k,)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()


def world_from_env(env: Mapping[str, str] | None = None) -> World:
    """The world torchrun describes in ``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` (one process if unset)."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" not in env:
        return World()
    try:
        size, rank = int(env["WORLD_SIZE"]), int(env.get("RANK", "0"))
        local_rank = int(env.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise LorasumError(
            "WORLD_SIZE, RANK and LOCAL_RANK must be integers; launch with torchrun"
        ) from None
    if size < 1 or not 0 <= rank < size or local_rank < 0:
        raise LorasumError(
            f"RANK {rank} / WORLD_SIZE {size} do not describe a process group; launch with torchrun"
        )
    return World(rank, size, local_rank)


def rank_device(world: World, device: torch.device) -> torch.device:
    """On CUDA each rank takes its own GPU, ``cuda:LOCAL_RANK``; a CPU stays a CPU."""
    if not world.distributed or device.type != "cuda":
        return device
    if world.local_rank >= torch.cuda.device_count():
        raise LorasumError(
            f"LOCAL_RANK {world.local_rank} but {torch.cuda.device_count()} GPUs on this node; "
            "start at most one process per GPU (--nproc_per_node)"
        )
    return torch.device("cuda", world.local_rank)


@contextlib.contextmanager
def process_group(world: World, device_type: str) -> Iterator[None]:
    """Join the process group for the block (gloo on CPUs, NCCL on CUDA) and leave it after.

    A group that is already initialised (by the caller) is used and left alone.
    """
    if not world.distributed or dist.is_initialized():
        yield
        return
    if device_type == "cuda":
        torch.cuda.set_device(world.local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", world.local_rank))
    else:
        dist.init_process_group("gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def rank_rows(group: Sequence[int], rank: int, size: int) -> list[int]:
    """Rank ``rank``'s contiguous share of one global batch's rows, as even as possible.

    The first ``len(group) % size`` ranks take one row more; with fewer rows than ranks the
    last ranks take none. The shares of all ranks, in rank order, are ``group`` itself.
    """
    q, r = divmod(len(group), size)
    start = rank * q + min(rank, r)
    return list(group[start : start + q + (rank < r)])
