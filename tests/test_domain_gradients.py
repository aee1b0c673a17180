"""The adapter-free predictors as one unit per domain (`DomainGradientsTask`) and a unit that
compares their saved statistics (`DataPredictorsTask`): the statistics lie in the study
directory, a rerun reuses them, a domain whose files are gone is the only one recomputed, and
the values are those of computing every domain in one go. Tiny random model, two domains."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import lorasum.analysis.gradients as gradients
import lorasum.study.executors as executors
from lorasum.analysis.predictors.data import data_predictors, from_gradients
from lorasum.errors import LorasumError
from lorasum.io import MARKER, read_json
from lorasum.models import load_model, load_tokenizer, lorasum_home
from lorasum.study.ledger import LEDGER_NAME
from lorasum.study.plan import plan_study
from lorasum.study.reproduce import reproduce, resolve
from lorasum.study.tasks import DataPredictorsTask, DomainGradientsTask

DOMAINS = ("arith", "colors")
GRADIENT_UNITS = {f"gradients/None/gradients-{d}" for d in DOMAINS}
COMBINE_UNIT = "predictors/None/data-predictors"


def _settings(tiny_llama, qa_files) -> dict:
    return {
        "model": str(tiny_llama),
        "domains": [f"{d}={qa_files[d]}" for d in DOMAINS],
        "methods": "sum",
        "predictors": True,
        "cross_domain": False,
        "paper_variants": False,
        "precision": "fp32",
    }


def _use_home(mp, home: Path) -> None:
    """$LORASUM_HOME and the caches under it (the calibrations the predictors read)."""
    import lorasum.analysis.calibration

    mp.setenv("LORASUM_HOME", str(home))
    mp.setattr(lorasum.analysis.calibration, "cache_dir", lambda: home / "calibration")


def _run(out: Path, settings: dict) -> dict:
    return reproduce(out, preset="tiny", progress=False, **settings)


@pytest.fixture(scope="module")
def finished(tiny_llama, qa_files, tmp_path_factory) -> tuple[Path, Path]:
    """A finished study with the predictors on, and the $LORASUM_HOME it ran with; copied by
    each test that changes it."""
    tmp = tmp_path_factory.mktemp("domaingrads")
    out, home = tmp / "study", tmp / "home"
    with pytest.MonkeyPatch.context() as mp:
        _use_home(mp, home)
        mp.setenv("LORASUM_WORKERS", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        _run(out, _settings(tiny_llama, qa_files))
    return out, home


@pytest.fixture
def copied(finished, tmp_path, monkeypatch) -> Path:
    """A copy of the finished study, run with a copy of its $LORASUM_HOME."""
    out, home = finished
    shutil.copytree(home, tmp_path / "home")
    _use_home(monkeypatch, tmp_path / "home")
    return Path(shutil.copytree(out, tmp_path / "study"))


def _plan(out: Path, tiny_llama, qa_files):
    return plan_study(resolve(out, "tiny", None, _settings(tiny_llama, qa_files), False).layout)


def _record(monkeypatch) -> tuple[list[str], list[str]]:
    """The ids of the units run from now on, and the module groups whose gradients are
    computed (each `gradient_sums` pass)."""
    ran, passes = [], []
    run, sums = executors.run_task, gradients.gradient_sums

    def recording(task, model, tokenizer):
        ran.append(task.id)
        return run(task, model, tokenizer)

    def counting(model, batches, modules):
        passes.append(list(modules))
        return sums(model, batches, modules)

    monkeypatch.setattr(executors, "run_task", recording)
    monkeypatch.setattr(gradients, "gradient_sums", counting)
    return ran, passes


def test_each_domain_is_a_unit_whose_statistics_lie_in_the_study(finished, tiny_llama, qa_files):
    out, home = finished
    plan = _plan(out, tiny_llama, qa_files)
    units = plan.of_type(DomainGradientsTask)
    (combine,) = plan.of_type(DataPredictorsTask)
    assert [t.domain for t in units] == list(DOMAINS)
    assert combine.dependencies() == tuple(units)  # the very task objects of the plan
    assert all(t.seed is None and t.resources().memory_gb == 4.0 for t in units)
    ledger = read_json(out / LEDGER_NAME)
    for t in units:
        assert t.output() == out / "gradients" / t.domain
        marker = read_json(t.output() / MARKER)
        assert marker["key"] == t.key()
        files = [t.output() / f for f in set(marker["files"].values())]
        assert files and all(f.suffix == ".safetensors" and f.is_file() for f in files)
        assert ledger[t.id]["output"] == f"gradients/{t.domain}"
        # the second-level cache keeps the key it always had, and holds the same bytes
        cached = home / "gradients" / f"{gradients.FILE_PREFIX}{marker['info']['gradient_key']}"
        assert all((cached / f.name).read_bytes() == f.read_bytes() for f in files)
    assert combine.cost() < min(t.cost() for t in units)  # it only compares saved statistics
    combos = read_json(out / "data_predictors.json")["result"]
    assert set(combos["arith+colors"]) >= {"grad_cosine_rms", "base_loss_mean"}


def test_the_values_equal_every_domain_in_one_go(finished, tiny_llama, qa_files):
    """The oracle: today's in-one-go function, with every statistic kept in memory (no cache
    read), against the study's per-domain units and their comparison."""
    out, _ = finished
    lay = resolve(out, "tiny", None, _settings(tiny_llama, qa_files), False).layout
    model, tok = load_model(lay.model, torch.device("cpu")), load_tokenizer(lay.model)
    combos = [tuple(c) for c in lay.combos]
    once = data_predictors(
        model,
        tok,
        lay.sources,
        combos,
        lay.base_cfg.max_length,
        model_spec=lay.model,
        cache=False,
    )
    study = read_json(out / "data_predictors.json")["result"]
    assert list(study) == list(once) == ["arith+colors"]
    for c, values in once.items():
        assert study[c].keys() == values.keys()
        for name, x in values.items():
            assert study[c][name] == pytest.approx(x, rel=1e-6, abs=1e-9), name
    assert abs(study["arith+colors"]["grad_cosine_mean"]) < 0.999  # not trivially parallel
    results = read_json(out / "results.json")
    per_seed = results["combinations"][0]["per_seed"][0]["predictors"]
    assert per_seed["grad_cosine_rms"] == study["arith+colors"]["grad_cosine_rms"]
    # the unit's statistics read back from the study compare to the same numbers
    grads = {
        t.domain: t.statistics()
        for t in _plan(out, tiny_llama, qa_files).of_type(DomainGradientsTask)
    }
    assert from_gradients(grads, combos) == study
    with pytest.raises(LorasumError, match="no gradient statistics for domain"):
        from_gradients({"arith": grads["arith"]}, combos)


def test_a_rerun_reuses_every_domain(copied, tiny_llama, qa_files, monkeypatch):
    ran, passes = _record(monkeypatch)
    _run(copied, _settings(tiny_llama, qa_files))
    assert ran == [] and passes == []


def test_a_domain_whose_files_are_gone_is_the_only_one_rerun(
    copied, finished, tiny_llama, qa_files, monkeypatch
):
    """Deleted from the study: only that domain's unit runs (from the second-level cache, no
    gradient computed) with the comparison that reads it; deleted from the cache too: it is
    computed again. Every number stays the same."""
    settings = _settings(tiny_llama, qa_files)
    before = read_json(copied / "data_predictors.json")
    shutil.rmtree(copied / "gradients" / "colors")
    planned = reproduce(copied, preset="tiny", plan_only=True, **settings)["units"]
    assert {u for u, state in planned.items() if state == "run"} == {
        "gradients/None/gradients-colors",
        COMBINE_UNIT,
    }
    ran, passes = _record(monkeypatch)
    _run(copied, settings)
    assert sorted(ran) == ["gradients/None/gradients-colors", COMBINE_UNIT]
    assert passes == []  # copied from $LORASUM_HOME/gradients
    assert read_json(copied / "data_predictors.json") == before

    ran.clear()
    shutil.rmtree(copied / "gradients" / "colors")
    shutil.rmtree(lorasum_home() / "gradients")
    _run(copied, settings)
    assert sorted(ran) == ["gradients/None/gradients-colors", COMBINE_UNIT]
    assert passes  # computed
    after = read_json(copied / "data_predictors.json")
    assert after["key"] == before["key"]
    assert after["result"]["arith+colors"] == pytest.approx(before["result"]["arith+colors"])
    assert (copied / "gradients" / "colors" / MARKER).is_file()
    first, now = (
        read_json(d / "results.json")["combinations"][0]["predictors"]
        for d in (finished[0], copied)
    )
    assert now == pytest.approx(first)


def test_the_comparison_refuses_statistics_that_are_gone(copied, tiny_llama, qa_files):
    """Run on its own after its input was removed: one line, nothing written."""
    (combine,) = _plan(copied, tiny_llama, qa_files).of_type(DataPredictorsTask)
    (copied / "data_predictors.json").unlink()
    shutil.rmtree(copied / "gradients" / "arith")
    with pytest.raises(LorasumError, match="statistics of arith are gone"):
        combine.run(model=None, tokenizer=None)
    assert not (copied / "data_predictors.json").exists()
