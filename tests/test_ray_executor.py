"""The Ray executor runs the same study as the local one: same numbers, lost actors retried,
user errors not retried, GPU units and unseen storage refused. One Ray instance per session."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

import lorasum
from lorasum.errors import LorasumError
from lorasum.study.executors import execute
from lorasum.study.reproduce import reproduce
from lorasum.study.tasks import EvalTask, Resources, Task
from lorasum.study.tasks.base import task_type


@pytest.fixture(scope="session")
def ray_session():
    ray = pytest.importorskip("ray")
    import logging

    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "RAY_memory_monitor_refresh_ms")}
    # Workers import this checkout's lorasum (not an installed copy); no memory-pressure kills
    # on a shared test machine.
    src = str(Path(lorasum.__file__).resolve().parents[1])
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (src, saved["PYTHONPATH"]) if p)
    os.environ["RAY_memory_monitor_refresh_ms"] = "0"  # noqa: SIM112 (Ray's own spelling)
    ray.init(
        num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING
    )
    # The test-only task types below travel to the actors by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield ray
    ray.shutdown()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _study(model: Path, qa_files: dict, out: Path, executor: str) -> dict:
    domains = [f"{n}={qa_files[n]}" for n in ("arith", "colors")]
    return reproduce(
        out,
        preset="tiny",
        model=str(model),
        domains=domains,
        workers=1,
        progress=False,
        executor=executor,
    )


def _numbers(results: dict) -> list[float]:
    """Every perplexity and cosine the study reports."""
    rows = results["combinations"]
    return (
        [v for r in rows for v in (r["ppl_sum"], r["ppl_merged"], r["rms_cosine"], r["delta_pct"])]
        + [s["perplexity"] for s in results["singles"].values()]
        + list(results["base"]["per_domain"].values())
    )


@pytest.fixture(scope="module")
def local_study(tiny_llama, qa_files, tmp_path_factory) -> dict:
    return _study(tiny_llama, qa_files, tmp_path_factory.mktemp("local") / "study", "local")


def _attempt(path: Path) -> int:
    """Count a run of a unit in ``path``; the number of runs before this one."""
    before = len(path.read_text().splitlines()) if path.exists() else 0
    with path.open("a") as f:
        f.write(f"{os.getpid()}\n")
    return before


class _EvalKilledOnce(EvalTask):
    """An evaluation whose actor process is SIGKILLed the first time it runs the sum's."""

    def run(self, *, model, tokenizer, **kw):
        if self.name.startswith("sum-") and _attempt(self.path.parents[3] / "attempts") == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        return EvalTask.run(self, model=model, tokenizer=tokenizer, **kw)


@task_type
class _UserError(Task):
    """A task whose input is wrong: it counts its runs in ``attempts`` and raises."""

    kind = "eval"
    attempts: Path
    gpus: int = 0

    @property
    def name(self) -> str:
        return f"user-error-{self.gpus}-gpus"

    def resources(self) -> Resources:
        return Resources(gpus=self.gpus)

    def cost(self) -> float:
        return 1.0

    def key(self) -> str:
        return self.name

    def cached(self) -> None:
        return None

    def run(self, *, model, tokenizer):
        _attempt(self.attempts)
        raise LorasumError("bad input: fix it")


def _user_error(attempts: Path, gpus: int = 0) -> _UserError:
    return _UserError(seed=0, attempts=attempts, gpus=gpus)


def test_ray_gives_the_same_study_with_a_killed_actor_and_a_rerun_runs_nothing(
    ray_session, local_study, tiny_llama, qa_files, tmp_path, monkeypatch
):
    from lorasum.study.ray_executor import RayExecutor

    with monkeypatch.context() as m:
        m.setattr("lorasum.study.plan.EvalTask", _EvalKilledOnce)
        on_ray = _study(tiny_llama, qa_files, tmp_path / "ray", "ray")
    pids = (tmp_path / "attempts").read_text().split()
    assert len(pids) == 2 and pids[0] != pids[1]  # killed once, run again in a new process
    assert _numbers(on_ray) == pytest.approx(_numbers(local_study), rel=1e-5)
    assert not list((tmp_path / "ray").glob(".lorasum-storage-*"))  # the marker is removed

    submitted = []
    real_submit = RayExecutor.submit
    monkeypatch.setattr(
        RayExecutor, "submit", lambda s, u: (submitted.append(u), real_submit(s, u))
    )
    again = _study(tiny_llama, qa_files, tmp_path / "ray", "ray")
    assert submitted == []
    assert _numbers(again) == _numbers(on_ray)


def test_a_user_error_is_not_retried(ray_session, tiny_llama, tmp_path):
    from lorasum.study.ray_executor import RayExecutor

    attempts = tmp_path / "attempts"
    runner = RayExecutor(str(tiny_llama), tmp_path / "study", "cpu", workers=1)
    with pytest.raises(LorasumError, match="^bad input: fix it$"):
        execute([_user_error(attempts)], runner)
    assert len(attempts.read_text().splitlines()) == 1


def test_gpu_units_are_refused_on_a_cluster_without_gpus(ray_session, tiny_llama, tmp_path):
    from lorasum.study.ray_executor import RayExecutor

    attempts = tmp_path / "attempts"
    runner = RayExecutor(str(tiny_llama), tmp_path / "study", "auto", workers=1)
    gpu_unit = _user_error(attempts, gpus=1)
    with pytest.raises(LorasumError, match="need a GPU .* has no GPU") as e:
        execute([_user_error(attempts), gpu_unit], runner)
    assert "\n" not in str(e.value)
    assert not attempts.exists()  # refused before anything ran


def test_an_actor_that_cannot_see_the_study_directory_refuses(ray_session, tiny_llama, tmp_path):
    from lorasum.study.ray_executor import RayExecutor, check_storage

    with pytest.raises(LorasumError, match="storage every node sees"):
        check_storage(tmp_path / "nowhere" / ".lorasum-storage-x")
    runner = RayExecutor(str(tiny_llama), tmp_path / "study", "cpu", workers=1)
    check_storage(runner.marker)  # the driver's marker is there …
    runner.marker.unlink()  # … and an actor that does not see it refuses to run
    with pytest.raises(LorasumError, match="cannot see the study directory .*study"):
        execute([_user_error(tmp_path / "attempts")], runner)
    assert not (tmp_path / "attempts").exists()


def test_without_ray_the_error_says_how_to_install_it(monkeypatch):
    from lorasum.study.ray_executor import import_ray

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails
    with pytest.raises(LorasumError, match=r"pip install 'lorasum\[ray\]'"):
        import_ray()
