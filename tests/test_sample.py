"""`--sample K`: K combinations of each order, seeded, the same for every seed and rerun; the
units it keeps are the full grid's units (same ids, outputs and keys), so a sampled study in a
full study's directory runs nothing. Tiny models and data, no network."""

from __future__ import annotations

import itertools
import json
from collections import Counter

import pytest

from lorasum.cli import main
from lorasum.errors import LorasumError
from lorasum.study.config import resolve_study
from lorasum.study.layout import combinations, sample_combinations
from lorasum.study.plan import plan_study
from lorasum.study.reproduce import reproduce, resolve
from lorasum.study.tasks import ComposeTask, EvalTask, TrainTask, VariantTask


def _static_key(task) -> str | None:
    """The task's key where it is known before anything runs, else None (it hashes inputs)."""
    try:
        return task.key()
    except (OSError, ValueError, LorasumError):
        return None


def _deps(task) -> list[str]:
    return [d.id for d in task.dependencies()]


NAMES = [f"d{i}" for i in range(7)]  # 21 pairs, 35 triples, 35 of 4


# --- the sampler (no model) ----------------------------------------------------------------


def test_sample_keeps_k_of_each_order_deterministically():
    grid = combinations(NAMES, 4)
    for k in (1, 3, 21, 30):
        kept = sample_combinations(grid, k, seed=5)
        assert kept == sample_combinations(grid, k, seed=5)  # same seed, same sample
        assert len(set(kept)) == len(kept) and set(kept) <= set(grid)
        assert [c for c in grid if c in kept] == kept  # the grid's order is kept
        available = Counter(len(c) for c in grid)
        # K of each order, every one of an order that has at most K
        assert Counter(len(c) for c in kept) == {n: min(k, a) for n, a in available.items()}
    assert sample_combinations(grid, 0, seed=5) == grid  # 0: every combination


def test_sample_differs_across_seeds_and_is_order_independent():
    grid = combinations(NAMES, 3)
    samples = {tuple(sample_combinations(grid, 3, seed)) for seed in range(6)}
    assert len(samples) > 1  # C(21,3)·C(35,3) choices: six seeds do not all agree
    # the choice depends on the domain set, not on the order domains are listed in
    reversed_grid = combinations(NAMES[::-1], 3)
    as_sets = lambda cs: {frozenset(c) for c in cs}  # noqa: E731
    for seed in range(3):
        assert as_sets(sample_combinations(reversed_grid, 3, seed)) == as_sets(
            sample_combinations(grid, 3, seed)
        )
    # each order draws on its own: raising the max order keeps the pairs
    pairs = sample_combinations(combinations(NAMES, 2), 4, seed=1)
    assert [c for c in sample_combinations(grid, 4, seed=1) if len(c) == 2] == pairs
    # and a sample is a uniform choice: over many seeds every pair is drawn (4 of 21 per seed)
    drawn = Counter(c for s in range(200) for c in sample_combinations(pairs_of(NAMES), 4, s))
    assert set(drawn) == set(itertools.combinations(NAMES, 2))


def pairs_of(names):
    return combinations(names, 2)


def test_sample_settings_are_validated():
    cfg = resolve_study("tiny", None, {"sample": 2, "sample_seed": 7})
    assert (cfg.sample, cfg.sample_seed) == (2, 7)
    assert (resolve_study("tiny").sample, resolve_study("tiny").sample_seed) == (0, 0)
    for bad, part in (
        ({"sample": -1}, "--sample -1"),
        ({"sample": "three"}, "--sample 'three': not an integer"),
        ({"sample": True}, "--sample True"),
        ({"sample_seed": -2}, "--sample-seed -2"),
    ):
        with pytest.raises(LorasumError) as e:
            resolve_study("tiny", None, bad)
        assert part in str(e.value) and "\n" not in str(e.value)


# --- the plan: kept units are the full grid's units ----------------------------------------


@pytest.mark.parametrize(("budget", "variants"), [("epochs", True), ("steps", False)])
def test_sampled_plan_is_a_subset_of_the_full_plan(
    budget, variants, tiny_llama, qa_files, tmp_path
):
    """Every unit of a sampled plan is in the full plan with the same output and key (the
    predictors, which are computed over the combinations run, aside); under `steps` a domain
    whose combinations were all left out still has its own single adapter; a kept triple's
    paper variants still get their pairs' merged-data adapters."""
    settings = {
        "model": str(tiny_llama),
        "domains": [f"{n}={p}" for n, p in qa_files.items()],
        "budget": budget,
        "predictors": True,
        "paper_variants": variants,
    }
    full = plan_study(resolve(tmp_path / "run", "tiny", None, settings, False).layout)
    lay = resolve(tmp_path / "run", "tiny", None, {**settings, "sample": 1}, False).layout
    assert len(lay.combos) == 2 and {len(c) for c in lay.combos} == {2, 3}  # 1 of 3 pairs, 1 of 1
    sampled = plan_study(lay)
    by_id = {t.id: t for t in full.tasks}
    for t in sampled.tasks:
        if t.kind == "predictors":
            continue
        assert t.id in by_id, t.id
        same = (v := by_id[t.id]).output(), _static_key(v), _deps(v)
        assert (t.output(), _static_key(t), _deps(t)) == same, t.id
    kept = set(lay.combos)
    summed = [t.adapter for t in sampled.of_type(EvalTask) if isinstance(t.adapter, ComposeTask)]
    sums = {c.combo for c in summed if c.method == "sum" and not isinstance(c, VariantTask)}
    assert sums == kept  # the combinations run are the sample
    triple = next(c for c in lay.combos if len(c) == 3)
    pairs = set(itertools.combinations(triple, 2)) if variants else set()
    trainings = sampled.of_type(TrainTask)
    assert {t.domains for t in trainings if not t.single} == kept | pairs
    assert {(d,) for d in qa_files} <= {t.domains for t in trainings}  # every domain's own single
    assert len(sampled.tasks) < len(full.tasks)


# --- a tiny study ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_then_sampled(tiny_llama, qa_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("sample") / "run"
    args = {
        "preset": "tiny",
        "model": str(tiny_llama),
        "domains": [f"{n}={p}" for n, p in qa_files.items()],
        "progress": False,
    }
    full = reproduce(out, **args)
    stamps = {p: p.stat().st_mtime_ns for p in (out / "seed-42").rglob("*")}
    plan = reproduce(out, **args, sample=1, sample_seed=3, plan_only=True)
    sampled = reproduce(out, **args, sample=1, sample_seed=3)
    after = {p: p.stat().st_mtime_ns for p in (out / "seed-42").rglob("*")}
    return out, full, plan, sampled, (stamps, after)


def test_sampled_study_in_a_full_study_runs_nothing(full_then_sampled):
    out, full, plan, sampled, (stamps, after) = full_then_sampled
    assert plan["units"] and set(plan["units"].values()) == {"cached"}
    assert "nothing to run" in plan["plan"]
    assert "sampled 1 of 3 pairs and 1 of 1 triple (--sample 1, seed 3)" in plan["plan"]
    # reused units give the full study's numbers for the combinations kept
    rows = {tuple(r["domains"]): r for r in full["combinations"]}
    for row in sampled["combinations"]:
        full_row = rows[tuple(row["domains"])]
        for key in ("ppl_sum", "ppl_merged", "delta_pct", "rms_cosine"):
            assert row[key] == full_row[key]
    assert after == stamps  # no adapter, composition or evaluation written again, none added


def test_sampled_study_runs_exactly_the_recorded_sample(full_then_sampled):
    out, full, _, sampled, _ = full_then_sampled
    sample = sampled["sample"]
    kept = [tuple(c) for o in sample["orders"] for c in o["kept"]]
    assert [tuple(r["domains"]) for r in sampled["combinations"]] == kept
    assert kept == sample_combinations(combinations(list(sampled["domains"])), 1, 3)
    assert (sample["k"], sample["seed"], sample["available"], sample["kept"]) == (1, 3, 4, 2)
    assert [(o["order"], o["available"]) for o in sample["orders"]] == [(2, 3), (3, 1)]
    assert full["sample"] is None and len(full["combinations"]) == 4
    assert sampled["config"]["sample"] == 1 and sampled["config"]["sample_seed"] == 3
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["sample"] == sample
    report = (out / "report.md").read_text()
    assert "sampled 1 of 3 pairs and 1 of 1 triple (--sample 1, seed 3)" in report


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--sample", "-1"], "--sample -1"),
        (["--sample", "two"], "--sample: invalid int value"),
        (["--sample", "2", "--sample-seed", "-1"], "--sample-seed -1"),
    ],
)
def test_bad_sample_is_one_line_exit_2_nothing_written(flags, message, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["reproduce", "--preset", "tiny", "--out", str(out), *flags]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors exit from parse_args
        code = e.code
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and err.count("\n") == 1
    assert not out.exists()
