"""Precision is explicit: LORASUM_PRECISION decides what ``auto`` means for every command and
every worker of a study, and each result records the precision it was made in. The verdict of
``auto`` itself is faked here (CPU flags and timings), never this machine's."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import qa_domains

from lorasum.cli import main
from lorasum.errors import LorasumError
from lorasum.models import (
    PRECISION_ENV,
    autocast_dtype,
    precision,
    precision_setting,
    resolve_precision,
)
from lorasum.study.reproduce import reproduce

CPU = torch.device("cpu")


@pytest.fixture
def verdict(monkeypatch):
    """A faked CPU verdict for ``auto`` (no env override): set ``verdict["bf16"]``."""
    state = {"bf16": False}
    monkeypatch.delenv(PRECISION_ENV, raising=False)
    monkeypatch.setattr(
        precision, "cpu_bf16_verdict", lambda refresh=False: {"use_bf16": state["bf16"]}
    )
    return state


def test_explicit_precision_beats_the_variable_which_beats_the_verdict(verdict, monkeypatch):
    for fast in (False, True):
        verdict["bf16"] = fast
        assert resolve_precision("auto", CPU) == ("bf16" if fast else "fp32")
        for forced in ("bf16", "fp32"):
            monkeypatch.setenv(PRECISION_ENV, forced)
            assert precision_setting("auto") == forced
            assert resolve_precision("auto", CPU) == forced
            assert resolve_precision("fp32", CPU) == "fp32"  # an explicit flag stands
            assert resolve_precision("bf16", CPU) == "bf16"
        monkeypatch.setenv(PRECISION_ENV, " AUTO ")
        assert resolve_precision("auto", CPU) == ("bf16" if fast else "fp32")
        monkeypatch.delenv(PRECISION_ENV)


def test_a_bad_variable_or_flag_is_one_clear_line(
    verdict, monkeypatch, tiny_llama, qa_files, capsys
):
    monkeypatch.setenv(PRECISION_ENV, "fp16")
    with pytest.raises(
        LorasumError, match="LORASUM_PRECISION='fp16': set it to auto, bf16 or fp32"
    ):
        autocast_dtype("auto", CPU)
    assert autocast_dtype("fp32", CPU) is None  # not consulted where the flag is explicit
    with pytest.raises(LorasumError, match="unknown precision 'fp8'"):
        precision_setting("fp8")
    code = main(["eval", "--model", str(tiny_llama), "--data", str(qa_files["arith"]), "--json"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "LORASUM_PRECISION" in err[0]


def _train(tiny_llama, data, out, *extra) -> dict:
    argv = [
        "train",
        "--model",
        str(tiny_llama),
        "--data",
        str(data),
        "--out",
        str(out),
        "--max-steps",
        "2",
        "--max-length",
        "32",
        "--batch-size",
        "4",
        "--no-eval-val",
        *extra,
    ]
    assert main(argv) == 0
    return json.loads((out / "lorasum.json").read_text())


def test_train_and_eval_record_the_precision_they_used(
    verdict, monkeypatch, tiny_llama, qa_files, tmp_path, capsys
):
    """``auto`` follows the (faked) verdict, then the variable; the adapter's key and marker
    name the precision used, so adapters of two precisions are never taken for each other."""
    data = qa_files["arith"]
    verdict["bf16"] = True
    a = _train(tiny_llama, data, tmp_path / "a")
    assert a["config"]["precision"] == a["metrics"]["precision"] == "bf16"
    monkeypatch.setenv(PRECISION_ENV, "fp32")
    b = _train(tiny_llama, data, tmp_path / "b")
    assert b["config"]["precision"] == b["metrics"]["precision"] == "fp32"
    assert a["key"] != b["key"]
    c = _train(tiny_llama, data, tmp_path / "c", "--precision", "fp32")
    assert c["key"] == b["key"]  # auto under LORASUM_PRECISION=fp32 is --precision fp32
    capsys.readouterr()
    args = ["eval", "--model", str(tiny_llama), "--data", str(data), "--max-length", "32", "--json"]
    assert main([*args, "--adapter", str(tmp_path / "b")]) == 0
    assert json.loads(capsys.readouterr().out)["precision"] == "fp32"
    monkeypatch.setenv(PRECISION_ENV, "bf16")
    assert main([*args, "--adapter", str(tmp_path / "b")]) == 0
    assert json.loads(capsys.readouterr().out)["precision"] == "bf16"


def _study_precisions(out) -> set[str]:
    """Every precision recorded anywhere in a finished study directory."""
    seen = set()
    for marker in out.glob("seed-*/adapters/*/lorasum.json"):
        m = json.loads(marker.read_text())
        seen |= {m["config"]["precision"], m["metrics"]["precision"]}
    for ev in out.glob("seed-*/evals/*.json"):
        seen.add(json.loads(ev.read_text())["result"]["precision"])
    seen.add(json.loads((out / "config.json").read_text())["train"]["precision"])
    seen.add(json.loads((out / "results.json").read_text())["manifest"]["hardware"]["precision"])
    return seen


@pytest.mark.parametrize("forced,workers", [("bf16", 2), ("fp32", 1)])
def test_every_worker_of_a_study_runs_in_the_forced_precision(
    forced, workers, verdict, monkeypatch, tiny_llama, qa_files, tmp_path
):
    """The variable reaches every worker process; the opposite verdict is faked so that a
    worker measuring its own would show."""
    verdict["bf16"] = forced == "fp32"
    monkeypatch.setenv(PRECISION_ENV, forced)
    out = tmp_path / "study"
    kw = dict(preset="tiny", model=str(tiny_llama), progress=False, max_order=2)
    reproduce(out, domains=qa_domains(qa_files, 2), workers=workers, **kw)
    assert _study_precisions(out) == {forced}
    assert f"precision {forced}" in (out / "report.md").read_text()
    # continuing the study in the other precision is refused in one line, before any work
    monkeypatch.setenv(PRECISION_ENV, "fp32" if forced == "bf16" else "bf16")
    with pytest.raises(
        LorasumError, match=f"holds a study run in {forced}; .* --precision {forced}"
    ):
        reproduce(out, domains=qa_domains(qa_files, 2), workers=1, **kw)
    reproduce(out, domains=qa_domains(qa_files, 2), workers=1, precision=forced, **kw)  # reused
    assert _study_precisions(out) == {forced}
