"""Tasks as types (`lorasum.study.tasks`): the plan is a graph of task objects, and the task types
keep the cache keys of the string-based units they replaced, byte for byte, so that a study
directory written before is reused whole.

The reference is the code itself: `LEGACY_COMMIT`'s source, taken from this checkout's git
history, runs each study in a subprocess (`legacy_keys.py`) and writes every unit's key as it
computed it; then this checkout plans the same study, compares task by task and reruns it.
A deliberate change of a key (a new field in it) needs a newer `LEGACY_COMMIT`.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from conftest import make_qa, write_jsonl

import lorasum.analysis.gradients as gradients
import lorasum.study.executors as executors
from lorasum._version import __version__
from lorasum.io import read_json
from lorasum.results_schema import upgrade
from lorasum.study.executors import execute
from lorasum.study.plan import plan_study
from lorasum.study.reproduce import reproduce, resolve
from lorasum.study.tasks import (
    AdapterTask,
    DataPredictorsTask,
    DomainGradientsTask,
    EvalTask,
    FittedTask,
    Task,
    TrainTask,
)
from lorasum.study.tasks.base import task_type

# the last commit of the string-based units (`lorasum.study.units`)
LEGACY_COMMIT = "6a383e213a5b5874749306277fa78f00e26b6f18"
REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "lorasum"


def _every_kind(tiny_llama: Path, qa_files: dict, tmp: Path) -> dict:
    """Two domains under the epochs budget: singles, merged, the sum, a data-free, a
    calibration and both fitted methods, routes, predictors, accuracy twins, snapshots."""
    return {
        "model": str(tiny_llama),
        "domains": [f"{n}={p}" for n, p in list(qa_files.items())[:2]],
        "methods": "sum,tsv,regmean,calibrated,learned",
        "routes": "oracle,nearest,arrow",
        "predictors": True,
        "metrics": "perplexity,accuracy",
        "snapshots": "0.5,1",
    }


def _steps(tiny_llama: Path, qa_files: dict, tmp: Path) -> dict:
    """Three domains under the `steps` budget: singles at several step counts
    (``arith@6steps``), each calibrated, and the paper's variants of the triple."""
    return {
        "model": str(tiny_llama),
        "domains": [f"{n}={p}" for n, p in qa_files.items()],
        "budget": "steps",
        "methods": "sum,regmean",
        "predictors": False,
    }


def _merge_aware(tiny_llama: Path, qa_files: dict, tmp: Path) -> dict:
    """The converged budget with merge-aware checkpoints (160 rows: 16 validation rows)."""
    files = {
        n: write_jsonl(tmp / f"{n}.jsonl", make_qa(n, 160, seed=i))
        for i, n in enumerate(("arith", "colors"))
    }
    return {
        "model": str(tiny_llama),
        "domains": [f"{n}={p}" for n, p in files.items()],
        "budget": "converged",
        "merge_aware": True,
        "predictors": False,
        "cross_domain": False,
        "eval_every": 1,
        "patience": 1,
        "max_eval": 16,
        "max_epochs": 3,
    }


STUDIES = {"every-kind": _every_kind, "steps": _steps, "merge-aware": _merge_aware}


@pytest.fixture(scope="module")
def legacy_src(tmp_path_factory) -> Path:
    """lorasum's ``src`` at `LEGACY_COMMIT` (skipped outside a git checkout that holds it)."""
    if shutil.which("git") is None:
        pytest.skip("needs git: the reference is the code at LEGACY_COMMIT")
    found = subprocess.run(
        ["git", "-C", str(REPO), "cat-file", "-e", f"{LEGACY_COMMIT}^{{commit}}"],
        capture_output=True,
    )
    if found.returncode != 0:
        pytest.skip(f"this checkout's history has no {LEGACY_COMMIT[:7]}")
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", LEGACY_COMMIT, "src"], capture_output=True, check=True
    ).stdout
    dest = tmp_path_factory.mktemp("legacy")
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data")
    return dest / "src"


def _share_caches(monkeypatch, home: Path) -> None:
    """This process reads the caches the legacy run wrote under ``home`` ($LORASUM_HOME)."""
    import lorasum.analysis.calibration
    import lorasum.methods.projection

    monkeypatch.setenv("LORASUM_HOME", str(home))
    monkeypatch.setattr(lorasum.analysis.calibration, "cache_dir", lambda: home / "calibration")
    monkeypatch.setattr(lorasum.methods.projection, "spectra_dir", lambda: home / "spectra")


def _legacy_study(legacy_src: Path, settings: dict, out: Path, home: Path) -> dict[str, dict]:
    """Run the study with the legacy code; every unit's id → kind, key, output, deps, …"""
    settings_path, keys_path = out.parent / "settings.json", out.parent / "legacy_keys.json"
    settings_path.write_text(json.dumps(settings))
    env = {**os.environ, "PYTHONPATH": str(legacy_src), "LORASUM_HOME": str(home)}
    script = Path(__file__).with_name("legacy_keys.py")
    run = subprocess.run(
        [sys.executable, str(script), str(out), str(settings_path), __version__, str(keys_path)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(keys_path.read_text())


def _numbers(obj, path: str = "") -> dict[str, object]:
    """Every leaf of results.json by its path, without what differs between a run and a rerun
    (seconds, the run manifest)."""
    timing = {"seconds", "wall_seconds", "tokens_per_second", "timing", "manifest"}
    if isinstance(obj, dict):
        items = [(k, v) for k, v in obj.items() if k not in timing]
    elif isinstance(obj, list):
        items = list(enumerate(obj))
    else:
        return {path: obj}
    return {p: v for k, x in items for p, v in _numbers(x, f"{path}/{k}").items()}


def _same(a, b) -> bool:
    """Equal, floats to 1e-9: a cosine's float64 sum over modules can differ in its last bit
    between two processes."""
    if isinstance(a, float) and isinstance(b, float):
        return a == pytest.approx(b, rel=1e-9, abs=1e-15, nan_ok=True)
    return a == b


@pytest.mark.parametrize("case", list(STUDIES))
def test_a_study_of_the_string_based_units_is_reused_whole(
    case, legacy_src, tiny_llama, qa_files, tmp_path, monkeypatch
):
    settings = STUDIES[case](tiny_llama, qa_files, tmp_path)
    out, home = tmp_path / "study", tmp_path / "home"
    legacy = _legacy_study(legacy_src, settings, out, home)
    before = read_json(out / "results.json")
    _share_caches(monkeypatch, home)

    plan = plan_study(resolve(out, "tiny", None, settings, False).layout)
    # the same units in the same order: ids, outputs, inputs, cost, resources, labels; besides
    # them, a unit per domain for its gradients (`DomainGradientsTask`, new since), which the
    # data's predictors now read instead of computing them (their key is kept)
    added = plan.of_type(DomainGradientsTask)
    assert [t.id for t in plan.tasks if t not in added] == list(legacy)
    assert len(added) == (len(settings["domains"]) if settings["predictors"] else 0)
    for t in plan.tasks:
        if t in added:
            continue
        old = legacy[t.id]
        assert t.kind == old["kind"], t.id
        assert t.key() == old["key"], t.id  # the cache key, byte for byte
        assert (None if t.output() is None else str(t.output())) == old["output"], t.id
        if isinstance(t, DataPredictorsTask):  # a comparison of its per-domain inputs now
            assert (old["deps"], t.dependencies()) == ([], tuple(added))
            assert t.cost() < old["cost"]
            assert (t.resources().memory_gb, t.label) == (old["memory_gb"], old["label"])
            continue
        assert [d.id for d in t.dependencies()] == old["deps"], t.id
        assert (t.cost(), t.resources().memory_gb, t.label) == (
            old["cost"],
            old["memory_gb"],
            old["label"],
        )
    assert {type(t).__name__ for t in plan.tasks} >= {"TrainTask", "EvalTask"}

    ran: list[str] = []
    passes: list[list[str]] = []
    run, sums = executors.run_task, gradients.gradient_sums
    monkeypatch.setattr(
        executors, "run_task", lambda t, m, tok: (ran.append(t.id), run(t, m, tok))[1]
    )
    monkeypatch.setattr(gradients, "gradient_sums", lambda *a: (passes.append(a[2]), sums(*a))[1])
    reproduce(out, preset="tiny", progress=False, **settings)
    # every unit reused; the per-domain units copy the statistics the legacy run cached in
    # $LORASUM_HOME/gradients (the same key there): no gradient is computed again
    assert ran == [t.id for t in added] and passes == []
    # the legacy file is version 1 of results.json: migrated, it has what the current version
    # adds (schema_version, domain lists beside joined combination names) where a study writes it
    old, new = _numbers(upgrade(before)), _numbers(read_json(out / "results.json"))
    # routes record their summaries' prompt tokens since the string-based units' commit
    new = {p: v for p, v in new.items() if not p.endswith("/router_tokens")}
    assert list(new) == list(old)  # and the same numbers
    assert [p for p in old if not _same(old[p], new[p])] == []


def test_the_plan_is_a_graph_of_its_own_task_objects(tiny_llama, qa_files, tmp_path):
    """Every dependency is a task, the very object the plan holds (no id is looked up), and
    each kind of task reads what its type says."""
    settings = _every_kind(tiny_llama, qa_files, tmp_path)
    plan = plan_study(resolve(tmp_path / "s", "tiny", None, settings, False).layout)
    held = {id(t) for t in plan.tasks}
    for t in plan.tasks:
        for d in t.dependencies():
            assert isinstance(d, Task) and id(d) in held, (t.id, d)
    for t in plan.of_type(EvalTask):
        assert t.adapter is None or isinstance(t.adapter, AdapterTask)
        assert t.dependencies() == (() if t.adapter is None else (t.adapter,))
    for t in plan.of_type(FittedTask):
        assert t.merged.domains == t.combo and all(s.single for s in t.singles)
    for seed, runs in plan.trainings.items():
        assert all(isinstance(t, TrainTask) and t.seed == seed for t in runs.tasks)


@task_type
class _Step(Task):
    """A task of a hand-made graph: names full of the characters unit names are built from."""

    kind = "compose"
    title: str
    reads: tuple[Task, ...] = ()

    @property
    def name(self) -> str:
        return self.title

    def dependencies(self) -> tuple[Task, ...]:
        return self.reads

    def cost(self) -> float:
        return float(len(self.title))

    def key(self) -> str:
        return self.title

    def cached(self) -> None:
        return None

    def run(self, *, model, tokenizer) -> list[str]:
        return [self.title, *(r.title for r in self.reads)]


class _Inline:
    """An executor that runs tasks in the order submitted and remembers it."""

    slots = 1

    def __init__(self):
        self.queue: list[Task] = []
        self.order: list[str] = []

    def submit(self, task: Task) -> None:
        self.queue.append(task)

    def wait(self):
        task = self.queue.pop(0)
        self.order.append(task.title)
        return [(task, task.run(model=None, tokenizer=None), 0.0)]

    def close(self) -> None:
        pass


def test_execute_walks_the_objects_whatever_their_names():
    """`execute` orders by the tasks' own dependencies: names that look like other units'
    (``merged-…``, ``a+b``, ``x@2steps``, ``/``) change nothing; results are keyed by task."""
    a = _Step(seed=0, title="merged-a+b")
    b = _Step(seed=0, title="a@2steps/compose/0/merged-a+b", reads=(a,))
    c = _Step(seed=0, title="c", reads=(b, a))
    d = _Step(seed=0, title="method-calibrated-a+b+c-d", reads=(c,))
    runner = _Inline()
    results = execute([a, b, c, d], runner)
    assert runner.order == [a.title, b.title, c.title, d.title]
    assert results[d] == [d.title, c.title] and results[b] == [b.title, a.title]


def test_no_unit_name_is_parsed_back():
    """Names are built in `study.names` only: no study module strips or splits one, and the
    combination's name is defined once in the study and report layers."""
    parsing = (
        'removeprefix("merged-")',
        'removeprefix("variant-")',
        'split("@")',
        'len("method-',
        'len(f"method-',
        'startswith("merged-")',
        'startswith(f"method-',
    )
    study = [*sorted((SRC / "study").rglob("*.py"))]
    for path in study:
        text = path.read_text()
        assert not [p for p in parsing if p in text], path
    definitions = [p for p in SRC.rglob("*.py") if "def combo_name(" in p.read_text()]
    assert definitions == [SRC / "data" / "sources.py"]  # below the report, which names them too
