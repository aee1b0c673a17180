"""Run a study's independent units (trainings, evaluations) in parallel worker processes.

A 135M model on a small CPU does not keep two threads busy: measured on a 2-core AVX2 EPYC,
one training process gets about 1.5× from its second thread, while two single-threaded
processes each keep most of their one-thread speed. So on CPUs the study runs its units in
``workers`` processes of ``cores // workers`` threads each, every worker holding one copy of the
base model (loaded once). Units are deterministic functions of their config, so the results do
not depend on which worker ran them (up to float summation order across thread counts).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field

import torch

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
    """How many worker processes: 1 on GPUs; on CPUs one per core, at most 4, memory allowing."""
    env = os.environ.get("LORASUM_WORKERS")
    if env:
        return max(1, int(env))
    if device.type != "cpu":
        return 1
    by_memory = int(_available_memory_gb() // gb_per_worker)
    return max(1, min(available_cores(), 4, by_memory, n_units))


def _exit_with_parent(parent: int) -> None:
    """A worker whose study process died (SIGKILL, OOM) stops too, instead of computing on."""
    import threading
    import time

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="lorasum-parent-watch").start()


def _init_worker(
    model_spec: str, device: str, threads: int, verbose: bool, parent: int | None = None
) -> None:
    if parent is not None:
        _exit_with_parent(parent)
    torch.set_num_threads(threads)
    if not verbose:
        from lorasum.cli import _quiet_libraries

        _quiet_libraries()
    from lorasum.models import load_model, load_tokenizer

    _WORKER["tokenizer"] = load_tokenizer(model_spec)
    _WORKER["model"] = load_model(model_spec, device)


def _run_in_worker(fn: Callable, args: tuple, kwargs: dict):
    return fn(*args, model=_WORKER["model"], tokenizer=_WORKER["tokenizer"], **kwargs)


@dataclass
class Job:
    """``fn(*args, model=..., tokenizer=..., **kwargs)``; ``name`` labels the progress bar."""

    name: str
    fn: Callable
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    cost: float = 1.0  # relative work, for the progress bar (a bar advances by it when done)


class UnitRunner:
    """Runs jobs inline (1 worker, the caller's model) or in a pool of worker processes."""

    def __init__(self, model_spec: str, model, tokenizer, device: torch.device, workers: int):
        self.model_spec, self.model, self.tokenizer = model_spec, model, tokenizer
        self.device, self.workers = device, max(1, workers)
        self._pool: ProcessPoolExecutor | None = None

    def _get_pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            import multiprocessing as mp

            threads = max(1, available_cores() // self.workers)
            self._pool = ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=mp.get_context("spawn"),
                initializer=_init_worker,
                initargs=(
                    self.model_spec,
                    str(self.device),
                    threads,
                    log.isEnabledFor(logging.INFO),
                    os.getpid(),
                ),
            )
        return self._pool

    def run(self, jobs: Sequence[Job], bar=None) -> list:
        """Results in the order of ``jobs``; ``bar`` (tqdm) advances once per finished job."""
        if self.workers == 1 or len(jobs) <= 1:
            out = []
            for job in jobs:
                if bar is not None:
                    bar.set_postfix_str(job.name)
                out.append(
                    job.fn(*job.args, model=self.model, tokenizer=self.tokenizer, **job.kwargs)
                )
                if bar is not None:
                    bar.update(job.cost)
            return out
        pool = self._get_pool()
        futures = {
            pool.submit(_run_in_worker, job.fn, job.args, job.kwargs): i
            for i, job in enumerate(jobs)
        }
        results: list = [None] * len(jobs)
        try:
            for fut in as_completed(futures):
                i = futures[fut]
                results[i] = fut.result()  # re-raises a worker's exception here
                if bar is not None:
                    bar.set_postfix_str(jobs[i].name)
                    bar.update(jobs[i].cost)
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise
        return results

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> UnitRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
