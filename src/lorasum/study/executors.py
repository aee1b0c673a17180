"""Executors: where a plan's tasks run. They know nothing of what tasks mean: they ask a task
(`lorasum.study.tasks.Task`) for its dependencies, cost, resources and cached result, and run it.

An executor has ``slots`` (tasks it runs at once), ``submit(task)`` and ``wait()`` (at least one
finished task: ``(task, result, seconds)``); `execute` walks the plan's graph of task objects in
dependency order, skips finished tasks, submits the longest ready ones first and advances the
progress bar.

`LocalExecutor` (the default): units inline in this process (1 worker) or in ``workers`` spawned
processes, each holding one copy of the base model, loaded once. A 135M model on a small CPU
does not keep two threads busy: measured on a 2-core AVX2 EPYC, one training process gets about
1.5× from its second thread, while two single-threaded processes each keep most of their
one-thread speed. So on CPUs it runs ``workers`` processes of ``cores // workers`` threads; on a
machine with several GPUs one worker per GPU. Units are deterministic functions of their key,
so the results do not depend on which worker ran them (up to float summation order across
thread counts).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor
from concurrent.futures import wait as wait_futures
from typing import Any, Protocol

import torch

from lorasum.study.tasks import Task

log = logging.getLogger(__name__)

_WORKER: dict = {}  # in a worker process: the loaded base model and tokenizer


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _available_memory_gb() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 8.0


def auto_workers(device: torch.device, n_units: int, gb_per_worker: float = 4.0) -> int:
    """How many worker processes: one per GPU; on CPUs one per core, at most 4, memory allowing."""
    env = os.environ.get("LORASUM_WORKERS")
    if env:
        return max(1, int(env))
    if device.type == "cuda":
        return max(1, min(torch.cuda.device_count(), n_units))
    if device.type != "cpu":
        return 1
    by_memory = int(_available_memory_gb() // gb_per_worker)
    return max(1, min(available_cores(), 4, by_memory, n_units))


class Executor(Protocol):
    slots: int

    def submit(self, task: Task) -> None: ...

    def wait(self) -> list[tuple[Task, Any, float]]: ...

    def close(self) -> None: ...


def run_task(task: Task, model, tokenizer) -> tuple[Any, float]:
    """Run one task on a loaded model; its result and seconds."""
    t0 = time.perf_counter()
    result = task.run(model=model, tokenizer=tokenizer)
    return result, time.perf_counter() - t0


def _exit_with_parent(parent: int) -> None:
    """A worker whose study process died (SIGKILL, OOM) stops too, instead of computing on."""
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="lorasum-parent-watch").start()


def init_worker(
    model_spec: str,
    device: str,
    threads: int,
    verbose: bool,
    parent: int | None,
    bf16: bool | None = None,
):
    """Load the base model once per worker process (``device``: this worker's device; ``bf16``:
    the driver's CPU bf16 verdict, so that the worker does not measure its own)."""
    from lorasum.models.precision import settle_cpu_bf16

    if parent is not None:
        _exit_with_parent(parent)
    settle_cpu_bf16(bf16)
    torch.set_num_threads(threads)
    if not verbose:
        from lorasum.logs import quiet_libraries

        quiet_libraries()
    from lorasum.models.loading import load_model, load_tokenizer

    _WORKER["tokenizer"] = load_tokenizer(model_spec)
    _WORKER["model"] = load_model(model_spec, device)


def _in_worker(task: Task) -> tuple[Any, float]:
    return run_task(task, _WORKER["model"], _WORKER["tokenizer"])


def _worker_device(device: torch.device, index: int) -> str:
    """Worker ``index``'s device: the GPUs in turn (more workers than GPUs share them)."""
    if device.type != "cuda":
        return str(device)
    return f"cuda:{index % max(1, torch.cuda.device_count())}"


class LocalExecutor:
    """Tasks inline (1 worker: the caller's loaded model) or in ``workers`` processes; on a
    machine with several GPUs each worker process owns one GPU."""

    name = "local"

    def __init__(
        self,
        model_spec: str,
        model,
        tokenizer,
        device: torch.device,
        workers: int,
        bf16: bool | None = None,
    ):
        self.model_spec, self.model, self.tokenizer = model_spec, model, tokenizer
        self.device, self.slots, self.bf16 = device, max(1, workers), bf16
        self._pools: list[ProcessPoolExecutor] = []
        self._queue: list[Task] = []  # inline: submitted, not yet run
        self._futures: dict[Future, Task] = {}
        self._next = 0

    def _pool(self) -> ProcessPoolExecutor:
        """One pool of ``slots`` processes on a CPU; one single-process pool per GPU."""
        import multiprocessing as mp

        if not self._pools:
            per_gpu = self.device.type == "cuda" and self.slots > 1
            n_pools, size = (self.slots, 1) if per_gpu else (1, self.slots)
            threads = max(1, available_cores() // self.slots)
            for i in range(n_pools):
                init = (
                    self.model_spec,
                    _worker_device(self.device, i) if per_gpu else str(self.device),
                    threads,
                    log.isEnabledFor(logging.INFO),
                    os.getpid(),
                    self.bf16,
                )
                self._pools.append(
                    ProcessPoolExecutor(size, mp.get_context("spawn"), init_worker, init)
                )
        return min(self._pools, key=lambda p: sum(1 for f in self._futures if f.pool is p))

    def submit(self, task: Task) -> None:
        if self.slots == 1:
            self._queue.append(task)
            return
        pool = self._pool()
        fut = pool.submit(_in_worker, task)
        fut.pool = pool  # type: ignore[attr-defined]
        self._futures[fut] = task

    def wait(self) -> list[tuple[Task, Any, float]]:
        if self.slots == 1:
            task = self._queue.pop(0)
            return [(task, *run_task(task, self.model, self.tokenizer))]
        done, _ = wait_futures(list(self._futures), return_when=FIRST_COMPLETED)
        out = []
        for fut in done:
            task = self._futures.pop(fut)
            out.append((task, *fut.result()))  # re-raises a worker's exception here
        return out

    def close(self) -> None:
        for fut in self._futures:
            fut.cancel()
        self._futures.clear()
        for pool in self._pools:
            pool.shutdown(wait=True, cancel_futures=True)
        self._pools.clear()


class Verifier(Protocol):
    """What `execute` asks before reusing a finished task and tells after running one (the
    study's `lorasum.study.ledger.Ledger`); it knows what a task's output is, `execute` not."""

    def verify(self, task: Task) -> str | None: ...  # the output's problem, or None: whole

    def record(self, task: Task) -> None: ...  # the task has just finished

    def invalidate(self, task: Task) -> None: ...  # remove its output: it runs from nothing


def dependants(tasks: Sequence[Task], task: Task) -> list[Task]:
    """Every task that reads ``task``'s output, directly or through others, in plan order."""
    tainted = {task}
    for t in tasks:
        if any(d in tainted for d in t.dependencies()):
            tainted.add(t)
    return [t for t in tasks if t in tainted and t != task]


def _recompute(tasks: Sequence[Task], task: Task, problem: str, verifier: Verifier) -> set[Task]:
    """A damaged task: one warning line, its output and every dependant's removed; the tasks
    that must now run whatever their probes say."""
    later = dependants(tasks, task)
    log.warning(
        "%s; recomputing it and %d unit%s that depend%s on it",
        problem,
        len(later),
        "" if len(later) == 1 else "s",
        "s" if len(later) == 1 else "",
    )
    for t in (task, *later):
        verifier.invalidate(t)
    return {task, *later}


def execute(
    tasks: Sequence[Task],
    executor: Executor,
    bar=None,
    on_run: Callable[[Task, float], None] | None = None,
    verifier: Verifier | None = None,
) -> dict[Task, Any]:
    """Run every task that is not finished, each after its dependencies; results by task
    (a finished task's cached result included). The longest ready task goes first, and no
    more than ``executor.slots`` run at once, so a task that becomes ready jumps the queue.

    ``verifier``: asked before a finished task is reused; a damaged one runs again, and so does
    every task that depends on it (their outputs removed first); told of every task run."""
    results: dict[Task, Any] = {}
    cost = {t: t.cost() for t in tasks}
    waiting = {t: t for t in tasks}  # insertion-ordered: plan order breaks ties of cost
    running: set[Task] = set()
    to_run: set[Task] = set()
    try:
        check = getattr(executor, "check", None)  # refuses tasks it cannot run, before any runs
        if check is not None:
            check(list(tasks))
        while waiting or running:
            ready = sorted(
                (t for t in waiting if all(d in results for d in t.dependencies())),
                key=lambda t: -cost[t],
            )
            progressed = False
            for t in ready:
                if t not in to_run and verifier is not None:
                    problem = verifier.verify(t)
                    if problem is not None:
                        to_run |= _recompute(tasks, t, problem, verifier)
                cached = None if t in to_run else t.cached()
                if cached is not None:
                    del waiting[t]
                    results[t] = cached
                    _advance(bar, cost[t])
                    progressed = True
                    continue
                to_run.add(t)  # probed once: a task found missing is not probed again
                if len(running) < executor.slots:
                    del waiting[t]
                    executor.submit(t)
                    running.add(t)
            if progressed:
                continue  # finished tasks may have readied others
            if not running:
                raise RuntimeError(f"tasks wait on each other: {sorted(t.id for t in waiting)}")
            for t, result, seconds in executor.wait():
                running.discard(t)
                results[t] = result
                if verifier is not None:
                    verifier.record(t)
                if on_run is not None:
                    on_run(t, seconds)
                if bar is not None:
                    bar.set_postfix_str(t.label)
                _advance(bar, cost[t])
    finally:
        executor.close()
    return results


def _advance(bar, cost: float) -> None:
    if bar is not None:
        bar.update(cost)
