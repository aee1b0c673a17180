"""One study, one writer (the study directory's lock) and cached units verified before reuse
(the ledger, `reproduce --verify`). Tiny random model, two domains, one seed, no network."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import lorasum
import lorasum.study.executors as executors
from lorasum.cli import main
from lorasum.io import read_json, sha256_file
from lorasum.study.executors import dependants
from lorasum.study.ledger import (
    LEDGER_NAME,
    VERIFY_STATES,
    digest_problem,
    output_digests,
    safetensors_problem,
    structural_problem,
)
from lorasum.study.lock import HOLDER_NAME, LOCK_NAME, study_lock
from lorasum.study.reproduce import reproduce
from lorasum.study.tasks import Task
from lorasum.study.tasks.base import task_type

SRC = str(Path(lorasum.__file__).resolve().parents[1])  # this checkout's code, not an install

# What a rerun of the study recomputes when these files are damaged: the unit and everything
# that reads it (the single adapter `arith` → its evaluation, the sum and the sum's evaluation).
DAMAGED_ADAPTER = "seed-42/adapters/arith"
ADAPTER_AND_DEPENDANTS = {
    "train/42/arith",
    "eval/42/single-arith",
    "compose/42/sum-arith+colors",
    "eval/42/sum-arith+colors",
}


@pytest.fixture(autouse=True)
def _fp32(monkeypatch, tmp_path):
    monkeypatch.setenv("LORASUM_PRECISION", "fp32")
    monkeypatch.setenv("LORASUM_HOME", str(tmp_path / "home"))


def study_args(tiny_llama, qa_files, out: Path, *extra: str) -> list[str]:
    domains = ",".join(f"{n}={qa_files[n]}" for n in ("arith", "colors"))
    return [
        "reproduce",
        "--preset",
        "tiny",
        "--model",
        str(tiny_llama),
        "--domains",
        domains,
        "--out",
        str(out),
        "--precision",
        "fp32",
        *extra,
    ]


def _env(tmp: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "LORASUM_HOME": str(tmp / "home"),
        "LORASUM_PRECISION": "fp32",
    }


HOLD_SCRIPT = """
import sys, time
from pathlib import Path
from lorasum.study.lock import study_lock
out, release = Path(sys.argv[1]), Path(sys.argv[2])
with study_lock(out):
    print("held", flush=True)
    while not release.exists():
        time.sleep(0.05)
"""


def hold_lock(out: Path, release: Path, tmp: Path) -> subprocess.Popen:
    """A process holding the study's lock (through `study_lock`, as `reproduce` does) until
    ``release`` exists (or it is killed)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD_SCRIPT, str(out), str(release)],
        env=_env(tmp),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def listing(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under root → (size, mtime in ns): what a read-only command must not change."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
    }


def ran_units(monkeypatch) -> list[str]:
    """The ids of the units a study runs from now on (inline executor: `run_task`)."""
    ran: list[str] = []
    run = executors.run_task

    def recording(task, model, tokenizer):
        ran.append(task.id)
        return run(task, model, tokenizer)

    monkeypatch.setattr(executors, "run_task", recording)
    return ran


def _no_timing(obj):
    """Results without wall-clock measurements (they differ between any two runs)."""
    timing = {"seconds", "wall_seconds", "tokens_per_second", "timing"}
    if isinstance(obj, dict):
        return {k: _no_timing(v) for k, v in obj.items() if k not in timing}
    if isinstance(obj, list):
        return [_no_timing(v) for v in obj]
    return obj


@pytest.fixture(scope="module")
def finished(tiny_llama, qa_files, tmp_path_factory) -> Path:
    """A finished two-domain study, taken over from a holder killed with SIGKILL (its lock
    file and holder record are still there): copied by each test that damages it."""
    tmp = tmp_path_factory.mktemp("finished")
    out = tmp / "study"
    proc = hold_lock(out, tmp / "never", tmp)
    holder = read_json(out / HOLDER_NAME)
    assert holder["pid"] == proc.pid and holder["host"] == socket.gethostname()
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert (out / LOCK_NAME).exists() and (out / HOLDER_NAME).exists()  # left by the dead holder
    with pytest.MonkeyPatch.context() as mp:
        # the function-scoped fixtures' settings (conftest), for this module-scoped one
        for name, value in {
            "LORASUM_PRECISION": "fp32",
            "LORASUM_HOME": str(tmp / "home"),
            "LORASUM_WORKERS": "1",
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
        }.items():
            mp.setenv(name, value)
        assert main(study_args(tiny_llama, qa_files, out)) == 0
    assert not (out / HOLDER_NAME).exists()  # removed on release
    return out


def assert_ledger_matches_disk(out: Path, finished: Path) -> None:
    """The rerun's ledger records the same units as the first run's, each with the digests of
    the files now on disk; the adapter's weights have the first run's digest (evaluation files
    and markers hold seconds, so theirs differ)."""
    ledger, first = read_json(out / LEDGER_NAME), read_json(finished / LEDGER_NAME)
    assert ledger.keys() == first.keys()
    for entry in ledger.values():
        assert entry["files"] == output_digests(out / entry["output"])
    weights = "adapter_model.safetensors"
    assert ledger["train/42/arith"]["files"][weights] == first["train/42/arith"]["files"][weights]


def copy_study(finished: Path, tmp_path: Path) -> Path:
    out = tmp_path / "study"
    shutil.copytree(finished, out)
    return out


# --- the lock -----------------------------------------------------------------------------------


def test_a_killed_holders_lock_is_taken_over(finished):
    """The fixture's run started while a SIGKILLed process's lock file and holder record lay in
    the directory: it finished, and recorded every unit with an output in its ledger."""
    results = read_json(finished / "results.json")
    assert len(results["combinations"]) == 1
    ledger = read_json(finished / LEDGER_NAME)
    assert {"train/42/arith", "eval/None/base", "compose/42/sum-arith+colors"} <= set(ledger)
    entry = ledger["train/42/arith"]
    assert entry["output"] == DAMAGED_ADAPTER
    weights = finished / DAMAGED_ADAPTER / "adapter_model.safetensors"
    assert entry["files"]["adapter_model.safetensors"] == [
        weights.stat().st_size,
        sha256_file(weights),
    ]


def test_second_run_is_refused_at_once_then_waits(
    tiny_llama, qa_files, tmp_path, capsys, caplog, monkeypatch
):
    import lorasum.study.reproduce as rep

    out, release = tmp_path / "study", tmp_path / "release"
    proc = hold_lock(out, release, tmp_path)
    try:
        before = listing(out)
        with monkeypatch.context() as mp:  # refused before settings, data, directory or model
            mp.setattr(rep, "resolve", lambda *a, **k: pytest.fail("resolved under a held lock"))
            assert main(study_args(tiny_llama, qa_files, out)) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err
        assert f"is being run by pid {proc.pid} on host {socket.gethostname()} since " in err
        assert "--wait" in err
        assert listing(out) == before  # nothing written
        threading.Timer(1.0, release.touch).start()
        caplog.set_level(logging.WARNING)
        t0 = time.monotonic()
        assert main(study_args(tiny_llama, qa_files, out, "--wait")) == 0
        assert time.monotonic() - t0 >= 0.9  # it did wait for the holder
        assert proc.wait(timeout=30) == 0
    finally:
        release.touch()
        proc.wait(timeout=30)
    waited = [r.getMessage() for r in caplog.records if "waiting" in r.getMessage()]
    assert len(waited) == 1 and f"pid {proc.pid}" in waited[0]
    assert (out / "results.json").is_file()


def test_a_run_that_fails_before_its_study_starts_leaves_nothing(tiny_llama, qa_files, tmp_path):
    out = tmp_path / "new" / "study"
    args = study_args(tiny_llama, qa_files, out)
    missing = tmp_path / "missing.jsonl"
    args[args.index("--domains") + 1] = f"arith={missing},colors={qa_files['colors']}"
    assert main(args) == 2
    assert not (tmp_path / "new").exists()
    other = tmp_path / "notes"  # a directory that is not a study: refused, left as it was
    other.mkdir()
    (other / "todo.txt").write_text("x")
    assert main(study_args(tiny_llama, qa_files, other)) == 2
    assert sorted(p.name for p in other.iterdir()) == ["todo.txt"]


# --- the ledger ---------------------------------------------------------------------------------


def test_damaged_units_and_their_dependants_are_recomputed(
    finished, tiny_llama, qa_files, tmp_path, monkeypatch, caplog
):
    out = copy_study(finished, tmp_path)
    seed = out / "seed-42"
    weights = out / DAMAGED_ADAPTER / "adapter_model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(size // 2)
    (seed / "evals" / "merged-arith+colors.json").unlink()
    other = (seed / "evals" / "sum-arith+colors.json").read_text()
    (seed / "evals" / "single-colors.json").write_text(other)  # valid JSON, another unit's
    (out / "evals" / "base.json").write_text("\x00garbage{")
    # --plan sees what the run will find: the damaged units and their dependants are to run
    domains = [f"{n}={qa_files[n]}" for n in ("arith", "colors")]
    kw = dict(preset="tiny", model=str(tiny_llama), domains=domains, precision="fp32")
    planned = reproduce(out, plan_only=True, **kw)["units"]
    to_run = {u for u, state in planned.items() if state == "run"}
    assert to_run == ADAPTER_AND_DEPENDANTS | {
        "eval/42/merged-arith+colors",
        "eval/42/single-colors",
        "eval/None/base",
    }
    ran = ran_units(monkeypatch)
    caplog.set_level(logging.WARNING)
    assert main(study_args(tiny_llama, qa_files, out)) == 0
    assert set(ran) == ADAPTER_AND_DEPENDANTS | {
        "eval/42/merged-arith+colors",
        "eval/42/single-colors",
        "eval/None/base",
    }
    assert len(ran) == len(set(ran))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert (
        f"{DAMAGED_ADAPTER}: adapter_model.safetensors changed on disk "
        f"(size {size // 2:,} ≠ {size:,} recorded); recomputing it and 3 units that depend on it"
    ) in warnings
    assert (
        "seed-42/evals/merged-arith+colors.json is missing; "
        "recomputing it and 0 units that depend on it"
    ) in warnings
    assert sum("seed-42/evals/single-colors.json: changed on disk" in w for w in warnings) == 1
    assert sum(w.startswith("evals/base.json: changed on disk") for w in warnings) == 1
    # training is deterministic (one inline worker, fp32): the same bytes and the same numbers
    ref = finished / DAMAGED_ADAPTER / "adapter_model.safetensors"
    assert sha256_file(weights) == sha256_file(ref)
    assert _no_timing(read_json(out / "results.json")) == _no_timing(
        read_json(finished / "results.json")
    )
    assert_ledger_matches_disk(out, finished)
    ran.clear()
    assert main(study_args(tiny_llama, qa_files, out)) == 0
    assert ran == []  # healed: nothing left to recompute


def test_unrecorded_units_are_checked_and_recorded(
    finished, tiny_llama, qa_files, tmp_path, monkeypatch
):
    """A study without a ledger (older, or killed before recording): whole cached units are
    reused and recorded; a structurally broken one (a cut safetensors file) is recomputed
    with its dependants."""
    out = copy_study(finished, tmp_path)
    (out / LEDGER_NAME).unlink()
    weights = out / DAMAGED_ADAPTER / "adapter_model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size - 10)
    ran = ran_units(monkeypatch)
    assert main(study_args(tiny_llama, qa_files, out)) == 0
    assert set(ran) == ADAPTER_AND_DEPENDANTS
    assert_ledger_matches_disk(out, finished)


def test_verify_reports_without_writing(finished, tiny_llama, qa_files, tmp_path, capsys):
    out = copy_study(finished, tmp_path)
    before = listing(out)
    assert main(study_args(tiny_llama, qa_files, out, "--verify")) == 0
    text = capsys.readouterr().out
    header, *rows = text.splitlines()
    assert VERIFY_STATES == ("ok", "damaged", "missing", "not run", "unrecorded")
    assert header.split() == ["unit", "kind", *" ".join(VERIFY_STATES).split()]
    counts = {r.split()[0]: [int(x) for x in r.split()[1:]] for r in rows}
    assert counts == {
        "train": [3, 0, 0, 0, 0],
        "eval": [5, 0, 0, 0, 0],
        "compose": [1, 0, 0, 0, 0],
    }
    weights = out / DAMAGED_ADAPTER / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the last tensor: same size, another sha256
    weights.write_bytes(bytes(data))
    (out / "seed-42" / "evals" / "single-colors.json").unlink()
    before = listing(out)
    assert main(study_args(tiny_llama, qa_files, out, "--verify")) == 1
    lines = capsys.readouterr().out.splitlines()
    assert listing(out) == before
    assert (
        f"train/42/arith: {DAMAGED_ADAPTER}: adapter_model.safetensors changed on disk "
        "(same size, another sha256)"
    ) in lines
    assert "eval/42/single-colors: seed-42/evals/single-colors.json is missing" in lines
    counts = {r.split()[0]: [int(x) for x in r.split()[1:6]] for r in lines[1:4]}
    assert counts["train"] == [2, 1, 0, 0, 0] and counts["eval"] == [4, 0, 1, 0, 0]


def test_verify_of_a_study_not_run_yet(tiny_llama, qa_files, tmp_path, capsys):
    out = tmp_path / "never"
    assert main(study_args(tiny_llama, qa_files, out, "--verify")) == 0
    assert "not run" in capsys.readouterr().out
    assert not out.exists()


# --- the pure pieces ----------------------------------------------------------------------------


def test_a_cut_or_padded_safetensors_file_is_unreadable(tmp_path):
    path = tmp_path / "a.safetensors"
    save_file({"a": torch.ones(16, 16), "b": torch.zeros(3)}, str(path))
    assert safetensors_problem(path) is None
    whole = path.read_bytes()
    path.write_bytes(whole[:-1])
    assert "cannot be read" in safetensors_problem(path)
    path.write_bytes(whole + b"\0")
    assert "cannot be read" in safetensors_problem(path)
    path.write_bytes(whole[:20])
    assert "cannot be read" in safetensors_problem(path)
    path.write_bytes(whole[:4])
    assert "cannot be read" in safetensors_problem(path)


def test_digests_and_structure_of_an_output(tmp_path):
    out = tmp_path / "unit"
    out.mkdir()
    (out / "lorasum.json").write_text(json.dumps({"key": "k"}))
    (out / "log.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    (out / ".temp.tmp").write_text("ignored")  # a temp: not part of the output
    recorded = output_digests(out)
    assert sorted(recorded) == ["log.jsonl", "lorasum.json"]
    assert digest_problem(recorded, out) is None and structural_problem(out) is None
    (out / "extra.txt").write_text("more")  # files beyond the recorded ones are no damage
    assert digest_problem(recorded, out) is None
    (out / "log.jsonl").write_text('{"step": 1}\n{"step": 3}\n')  # same size, other bytes
    assert digest_problem(recorded, out) == "log.jsonl changed on disk (same size, another sha256)"
    (out / "log.jsonl").write_text('{"step": 1}\n{"step"')
    assert structural_problem(out) == "log.jsonl is not valid JSON"
    (out / "log.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    (out / "lorasum.json").unlink()
    assert digest_problem(recorded, out) == "lorasum.json is missing"
    assert structural_problem(out) == "has no lorasum.json"
    single = tmp_path / "x.json"
    single.write_text("{}")
    assert digest_problem(output_digests(single), single) is None
    single.write_text("[]")
    assert digest_problem(output_digests(tmp_path / "x.json"), single) is None
    recorded = {".": [2, "0" * 64]}
    assert digest_problem(recorded, single) == "changed on disk (same size, another sha256)"
    single.unlink()
    assert digest_problem(recorded, single) == "is missing"


@task_type
class _Node(Task):
    """A task of a test graph: its name and the tasks it reads."""

    kind = "compose"
    label_: str
    reads: tuple[Task, ...] = ()

    @property
    def name(self) -> str:
        return self.label_

    def dependencies(self) -> tuple[Task, ...]:
        return self.reads

    def cost(self) -> float:
        return 1.0

    def key(self) -> str:
        return self.label_

    def cached(self) -> None:
        return None

    def run(self, *, model, tokenizer) -> None:
        return None


def test_dependants_are_transitive_and_in_plan_order():
    a, b = _Node(seed=0, label_="a"), _Node(seed=0, label_="b")
    c = _Node(seed=0, label_="c", reads=(a,))
    d = _Node(seed=0, label_="d", reads=(c, b))
    e = _Node(seed=0, label_="e", reads=(b,))
    tasks = [a, b, c, d, e]
    assert dependants(tasks, a) == [c, d]
    assert [t.id for t in dependants(tasks, a)] == ["compose/0/c", "compose/0/d"]
    assert dependants(tasks, d) == []


def test_lock_is_reentrant_for_nobody(tmp_path):
    """Two holders in one process are refused too (the lock is per open file, not per pid)."""
    from lorasum.errors import LorasumError

    with study_lock(tmp_path / "s") as held:
        assert held.out == tmp_path / "s"
        refused = pytest.raises(LorasumError, match=f"pid {os.getpid()} on host")
        with refused, study_lock(tmp_path / "s"):
            pass
    with study_lock(tmp_path / "s"):  # released: taken again
        pass
