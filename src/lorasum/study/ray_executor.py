"""`RayExecutor`: a study's tasks on Ray actors, on this machine or on a cluster.

Each actor loads the base model once and runs units one at a time (as a local worker process
does); on a cluster with GPUs each actor holds one GPU. Ray restarts an actor whose process is
lost (killed, out of memory, a node gone) and runs its unit again, at most `MAX_RETRIES` times:
a unit is a pure function of its key and inputs, so running it twice is harmless. An exception
raised by the unit itself is not retried: a `LorasumError` stops the study with its one line,
as under the local executor, and a bug keeps its (remote) traceback.

Units read and write the study directory, so it must be on storage every node sees, at the same
path: the driver writes a marker file there and every actor checks that it sees it.
"""

from __future__ import annotations

import logging
import math
import socket
import uuid
from pathlib import Path
from typing import Any

from lorasum.errors import LorasumError
from lorasum.study.executors import available_cores, run_task
from lorasum.study.tasks import Task

log = logging.getLogger(__name__)

MAX_RETRIES = 2  # runs of a unit after the first, when its actor's process is lost
MARKER_PREFIX = ".lorasum-storage-"


def import_ray():
    try:
        import ray
    except ImportError:
        raise LorasumError("--executor ray needs Ray: pip install 'lorasum[ray]'") from None
    return ray


def check_storage(marker: str | Path) -> None:
    """Refuse to run on a node that does not see the driver's study directory."""
    marker = Path(marker)
    if not marker.is_file():
        raise LorasumError(
            f"Ray node {socket.gethostname()} cannot see the study directory {marker.parent}: "
            "--out must be on storage every node sees, at the same path (see docs/SCALE.md)"
        )


class UnitActor:
    """One Ray actor: the base model and tokenizer, loaded once, and the units run on them.

    A problem while starting (the storage check, loading the model) is raised again by `run`,
    where Ray hands the exception itself to the driver (from a constructor it only gives text)."""

    def __init__(
        self,
        model_spec: str,
        device: str,
        threads: int,
        marker: str,
        verbose: bool,
        bf16: bool | None = None,
    ):
        self.problem: Exception | None = None
        try:
            check_storage(marker)
            import torch

            from lorasum.models.precision import cpu_has_fast_bf16, settle_cpu_bf16

            # the driver's CPU verdict, unless this node's CPU would only emulate bf16
            settle_cpu_bf16(None if bf16 is None else bf16 and cpu_has_fast_bf16())

            torch.set_num_threads(threads)
            if not verbose:
                from lorasum.logs import quiet_libraries

                quiet_libraries()
            from lorasum.models.loading import load_model, load_tokenizer

            self.tokenizer = load_tokenizer(model_spec)
            self.model = load_model(model_spec, device)
        except Exception as e:  # noqa: BLE001 (raised again by every run)
            self.problem = e

    def run(self, task: Task) -> tuple[Any, float]:
        if self.problem is not None:
            raise self.problem
        return run_task(task, self.model, self.tokenizer)


class RayExecutor:
    """Units on Ray actors. ``address``: a running cluster ("auto" or HOST:PORT); None starts
    a local Ray instance sized to this machine (or uses the one this process already started).

    ``device``: the requested device (auto, cpu, cuda). Where the cluster has GPUs (and cpu was
    not asked for) there is one actor per GPU; else each actor takes ``cores // workers``
    threads, as a local worker would, and there are as many actors as the cluster's CPUs allow.
    """

    name = "ray"

    def __init__(
        self,
        model_spec: str,
        out: Path,
        device: str,
        workers: int,
        address=None,
        bf16: bool | None = None,
    ):
        self.ray = ray = import_ray()
        self.bf16 = bf16  # the driver's CPU bf16 verdict, handed to every actor
        self.verbose = log.isEnabledFor(logging.INFO)
        self.marker: Path | None = None
        self._idle: list = []  # actors waiting for a unit
        self._actors: list = []
        self._running: dict = {}  # ObjectRef -> (task, actor)
        self._started = not ray.is_initialized()
        if self._started:
            _init_ray(ray, address, self.verbose)
        resources = ray.cluster_resources()
        self.gpus = int(resources.get("GPU", 0))
        cpus = max(1, int(resources.get("CPU", 1)))
        if str(device).startswith("cuda") and not self.gpus:
            self.close()
            raise LorasumError("--device cuda: the Ray cluster has no GPU; use --device cpu")
        self.use_gpu = self.gpus > 0 and str(device) != "cpu"
        if self.use_gpu:
            self.threads, self.slots = 1, self.gpus
        else:
            self.threads = min(cpus, max(1, available_cores() // max(1, workers)))
            self.slots = max(1, cpus // self.threads)
        self._memory_per_slot = resources.get("memory", 0.0) / self.slots  # bytes
        self.memory_gb = 0.0  # the most any unit of the plan needs (`check`)
        self.model_spec = model_spec
        self.marker = Path(out).resolve() / f"{MARKER_PREFIX}{uuid.uuid4().hex}"
        self.marker.parent.mkdir(parents=True, exist_ok=True)
        self.marker.write_text(f"written by the lorasum driver on {socket.gethostname()}\n")

    def check(self, tasks: list[Task]) -> None:
        """Refuse, before anything runs, the tasks this cluster cannot run."""
        need_gpu = [t for t in tasks if t.resources().gpus > 0]
        if need_gpu and not self.use_gpu:
            where = "has no GPU" if not self.gpus else "runs on CPUs (--device cpu)"
            raise LorasumError(
                f"{len(need_gpu)} unit(s) need a GPU (e.g. {need_gpu[0].label}) but the Ray "
                f"cluster {where}; add GPU nodes (`ray start --num-gpus N`)"
            )
        several = [t for t in tasks if t.resources().gpus > 1]
        if several:
            raise LorasumError(
                f"unit {several[0].label} needs {several[0].resources().gpus} GPUs; a Ray actor "
                "holds one (see docs/SCALE.md for units on several GPUs)"
            )
        self.memory_gb = max([self.memory_gb, *(t.resources().memory_gb for t in tasks)])

    def _new_actor(self, task: Task):
        """An actor that reserves what the plan's largest unit needs (memory is a logical
        reservation in Ray: it keeps a node from taking more actors than it holds)."""
        memory = min(max(self.memory_gb, task.resources().memory_gb) * 2**30, self._memory_per_slot)
        options = {
            "num_cpus": self.threads,
            "num_gpus": 1 if self.use_gpu else 0,
            "max_restarts": -1,  # a lost actor comes back for the next unit …
            "max_task_retries": MAX_RETRIES,  # … and runs its unit again, this many times
        }
        if memory >= 2**20:
            options["memory"] = math.floor(memory)
        device = "cuda" if self.use_gpu else "cpu"
        actor = self.ray.remote(UnitActor).options(**options)
        handle = actor.remote(
            self.model_spec, device, self.threads, str(self.marker), self.verbose, self.bf16
        )
        self._actors.append(handle)
        return handle

    def submit(self, task: Task) -> None:
        if task.resources().gpus > 0:
            self.check([task])
        actor = self._idle.pop() if self._idle else self._new_actor(task)
        self._running[actor.run.remote(task)] = (task, actor)

    def wait(self) -> list[tuple[Task, Any, float]]:
        ray = self.ray
        refs = list(self._running)
        ready, rest = ray.wait(refs, num_returns=1)
        if rest:  # whatever else has finished too
            ready += ray.wait(rest, num_returns=len(rest), timeout=0)[0]
        out = []
        for ref in ready:
            task, actor = self._running.pop(ref)
            self._idle.append(actor)
            out.append((task, *self._result(ref, task)))
        return out

    def _result(self, ref, task: Task) -> tuple[Any, float]:
        from ray.exceptions import RayActorError, RayTaskError, WorkerCrashedError

        try:
            return self.ray.get(ref)
        except RayTaskError as e:
            if isinstance(e.cause, LorasumError):
                raise e.cause from None  # the user's one line, as under the local executor
            raise
        except (RayActorError, WorkerCrashedError):
            raise LorasumError(
                f"unit {task.label}: its Ray worker was lost {MAX_RETRIES + 1} times (out of "
                "memory? see the Ray logs); finished units are kept, run again to resume"
            ) from None

    def close(self) -> None:
        for actor in self._actors:
            self.ray.kill(actor)
        self._actors.clear()
        self._idle.clear()
        self._running.clear()
        if self.marker is not None:
            self.marker.unlink(missing_ok=True)
        if self._started and self.ray.is_initialized():
            self.ray.shutdown()


def _init_ray(ray, address: str | None, verbose: bool) -> None:
    """Connect to the cluster at ``address``, or start a local instance sized to this machine."""
    kwargs: dict = {
        "include_dashboard": False,
        "log_to_driver": verbose,
        "logging_level": logging.INFO if verbose else logging.ERROR,
    }
    if address is None:
        kwargs["num_cpus"] = available_cores()
    try:
        ray.init(address=address, **kwargs)
    except (ConnectionError, TimeoutError) as e:
        raise LorasumError(
            f"--ray-address {address}: no Ray cluster found ({e}); start one with `ray start --head`"
        ) from None
