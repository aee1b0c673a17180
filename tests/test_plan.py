"""`reproduce --plan`: it lists exactly the units the run then executes (none once finished), and
its time estimate uses only rates measured for the same model, device, precision and length."""

from __future__ import annotations

import json

from lorasum.study import plan as plan_mod
from lorasum.study import reproduce as reproduce_mod
from lorasum.study.reproduce import reproduce


def _run(tiny_llama, qa_files, out, **kw):
    domains = [f"{n}={p}" for n, p in qa_files.items()]
    return reproduce(
        out, preset="tiny", model=str(tiny_llama), domains=domains, progress=False, **kw
    )


def _spy_executed(monkeypatch) -> list[str]:
    """The ids of the units the executor really runs (not those found finished)."""
    ran: list[str] = []
    real = reproduce_mod.execute

    def spy(units, runner, bar, on_run, **kw):
        def record(u, s):
            ran.append(u.id)
            on_run(u, s)

        return real(units, runner, bar, on_run=record, **kw)

    monkeypatch.setattr(reproduce_mod, "execute", spy)
    return ran


def _to_run(plan: dict) -> set[str]:
    return {i for i, s in plan["units"].items() if s == "run"}


def test_plan_lists_exactly_the_units_the_run_executes(tiny_llama, qa_files, tmp_path, monkeypatch):
    out = tmp_path / "study"
    kw = {"seeds": [1], "methods": "sum"}
    first = _run(tiny_llama, qa_files, out, plan_only=True, **kw)
    assert not out.exists() or not (out / "results.json").exists()  # --plan writes no result
    assert _to_run(first) == set(first["units"])  # a new directory: everything runs
    ran = _spy_executed(monkeypatch)
    _run(tiny_llama, qa_files, out, **kw)
    assert sorted(ran) == sorted(_to_run(first))

    # one more method: the plan names exactly its new units, and the run runs only those
    kw["methods"] = "sum,tsv"
    second = _run(tiny_llama, qa_files, out, plan_only=True, **kw)
    new = _to_run(second)
    assert new and all("tsv" in i for i in new)
    assert set(second["units"]) - new >= set(first["units"])  # the rest is finished
    ran.clear()
    _run(tiny_llama, qa_files, out, **kw)
    assert sorted(ran) == sorted(new)

    finished = _run(tiny_llama, qa_files, out, plan_only=True, **kw)
    assert not _to_run(finished) and "nothing to run" in finished["plan"]


def test_rates_are_kept_per_model_device_precision_and_length(tmp_path, monkeypatch):
    monkeypatch.setenv("LORASUM_HOME", str(tmp_path))
    (tmp_path / "rates.json").write_text(json.dumps({"train": 3.0}))  # the old unkeyed file
    assert plan_mod.read_rates("tiny|cpu|fp32|64") == {}
    plan_mod.record_rates([("train", 10.0, 5.0), ("eval", 4.0, 1.0)], "tiny|cpu|fp32|64")
    plan_mod.record_rates([("train", 10.0, 50.0)], "7b|cuda|bf16|512")
    assert plan_mod.read_rates("tiny|cpu|fp32|64") == {"train": 0.5, "eval": 0.25}
    assert plan_mod.read_rates("7b|cuda|bf16|512") == {"train": 5.0}
    assert plan_mod.read_rates("tiny|cpu|bf16|64") == {}  # another precision: not known

    # a later run of one kind updates that kind only
    plan_mod.record_rates([("eval", 2.0, 1.0)], "tiny|cpu|fp32|64")
    assert plan_mod.read_rates("tiny|cpu|fp32|64") == {"train": 0.5, "eval": 0.5}


def test_plan_estimate_uses_the_profile_of_this_study(tiny_llama, qa_files, tmp_path, monkeypatch):
    monkeypatch.setenv("LORASUM_HOME", str(tmp_path / "home"))
    out = tmp_path / "study"
    kw = {"seeds": [1], "methods": "sum", "precision": "fp32"}
    plan = _run(tiny_llama, qa_files, out, plan_only=True, **kw)
    assert "no rate measured yet" in plan["plan"]
    _run(tiny_llama, qa_files, out, **kw)
    profiles = json.loads((tmp_path / "home" / "rates.json").read_text())["profiles"]
    assert list(profiles) == [f"{tiny_llama}|cpu|fp32|32"]
    # another length is another profile: no estimate from these rates
    other = _run(tiny_llama, qa_files, tmp_path / "s2", plan_only=True, max_length=40, **kw)
    assert "no rate measured yet" in other["plan"]
    again = _run(tiny_llama, qa_files, tmp_path / "s3", plan_only=True, **kw)
    assert "estimated time:" in again["plan"] and "min with" in again["plan"]
