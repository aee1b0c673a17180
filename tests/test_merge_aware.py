"""Merge-aware checkpoints: the choice rule on a scripted table, and the study's merge_aware row
(its sum == the sum of the chosen checkpoints; its score of the converged choice == the val
perplexity of `lorasum compose`'s sum)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import load_tiny, make_qa, rel_tol, run_precision, write_jsonl

from lorasum.adapters import read_adapter
from lorasum.compose import compose
from lorasum.errors import LorasumError
from lorasum.factors import delta
from lorasum.io import read_json
from lorasum.merge_aware import checkpoints, coordinate_choice
from lorasum.study.reproduce import reproduce


def _table(table: dict):
    calls = []

    def score(choice):
        calls.append(choice)
        return table[choice]

    return score, calls


def test_coordinate_choice_on_a_scripted_validation_table():
    # adapter 0 at steps 6/12/18, adapter 1 at 6/12; converged at (18, 12)
    table = {
        (6, 12): 9.0, (12, 12): 8.0, (18, 12): 10.0,
        (12, 6): 7.5, (6, 6): 1.0, (18, 6): 9.5,  # (6, 6) is the global best: one pass misses it
    }  # fmt: skip
    score, calls = _table(table)
    choice, scores = coordinate_choice([[6, 12, 18], [6, 12]], [18, 12], score)
    # pass 1: adapter 0 → 12 (8.0 < 10.0 < 9.0? no: 8.0 is lowest), then adapter 1 → 6 (7.5)
    assert choice == (12, 6)
    assert scores[choice] == 7.5
    assert len(calls) == len(set(calls)) == len(scores) == 4  # every choice scored once
    # a second pass goes on from there and finds the global best
    score, _ = _table(table)
    choice, _ = coordinate_choice([[6, 12, 18], [6, 12]], [18, 12], score, passes=2)
    assert choice == (6, 6)


def test_coordinate_choice_ties_keep_the_current_checkpoint_and_nan_loses():
    flat = {(a, b): 5.0 for a in (1, 2, 3) for b in (1, 2)}
    choice, _ = coordinate_choice([[1, 2, 3], [1, 2]], [3, 2], _table(flat)[0])
    assert choice == (3, 2)
    nan = {**flat, (1, 2): math.nan, (3, 2): 6.0}
    choice, scores = coordinate_choice([[1, 2, 3], [1, 2]], [3, 2], _table(nan)[0])
    assert choice == (2, 2) and scores[(1, 2)] == math.inf
    with pytest.raises(ValueError, match="start"):
        coordinate_choice([[1, 2]], [5], _table(flat)[0])


def _files(tmp_path):
    # 160 rows per domain: validation splits of 16, the fewest a converged run may stop on
    return {
        n: write_jsonl(tmp_path / f"{n}.jsonl", make_qa(n, 160, seed=i))
        for i, n in enumerate(("arith", "colors"))
    }


def _run(tiny_llama, files, out, **kw):
    return reproduce(
        out,
        preset="tiny",
        model=str(tiny_llama),
        domains=[f"{n}={p}" for n, p in files.items()],
        progress=False,
        budget="converged",
        eval_every=1,
        patience=1,
        max_eval=16,
        max_epochs=3,
        cross_domain=False,
        **kw,
    )


@pytest.fixture(scope="module")
def study(tiny_llama, tmp_path_factory):
    """One converged study with merge_aware (two domains, one pair), shared by the tests."""
    tmp = tmp_path_factory.mktemp("merge_aware")
    files = _files(tmp)
    out = tmp / "s"
    return files, out, _run(tiny_llama, files, out, merge_aware=True)


def test_study_merge_aware_sums_the_chosen_checkpoints(tiny_llama, study):
    files, out, res = study
    seed_dir = out / "seed-42"
    # every single kept a checkpoint at each validation point it reached; merged ones none
    for name in ("arith", "colors"):
        metrics = read_json(seed_dir / "adapters" / name / "lorasum.json")["metrics"]
        steps = sorted(checkpoints(seed_dir / "adapters" / name))
        assert steps == sorted({p["step"] for p in metrics["val_curve"]})
    assert not (seed_dir / "adapters" / "merged-arith+colors" / "snapshots").exists()

    composed = seed_dir / "methods" / "merge_aware" / "arith+colors"
    marker = read_json(composed / "lorasum.json")
    report = marker["budget"]
    assert report["split"] == "val" and report["evaluations"] >= 2
    assert report["val_perplexity"] <= report["val_perplexity_converged"]
    assert 0 < report["fraction"] == report["tokens"] / report["merged_training_tokens"]
    # the written adapter is exactly the sum of the chosen checkpoints (oracle: `compose`)
    chosen = [seed_dir / "adapters" / n for n in ("arith", "colors")]
    chosen = [
        d if step == report["converged_steps"][i] else d / "snapshots" / f"step-{step}"
        for i, (d, step) in enumerate(zip(chosen, report["chosen_steps"], strict=True))
    ]
    assert marker["sources"] == [str(p) for p in chosen]
    got = read_adapter(composed).modules
    parts = [read_adapter(p).modules for p in chosen]
    assert set(got) == set(parts[0])
    for m, f in got.items():  # merged == Σ s·B·A of the chosen checkpoints (dense definition)
        want = sum(delta(a[m].A, a[m].B, a[m].scale) for a in parts)
        torch.testing.assert_close(delta(f.A, f.B, f.scale), want, rtol=1e-5, atol=1e-6)

    # results: a method row like any other, with its cost in the budget's fitted list
    row = res["combinations"][0]
    assert "merge_aware" in row["methods"]
    fitted = [f for f in res["budget"]["calibrated"] if f["method"] == "merge_aware"]
    assert fitted and fitted[0]["chosen_steps"] == report["chosen_steps"]
    # rerun: nothing to do
    plan = _run(tiny_llama, files, out, merge_aware=True, plan_only=True)
    assert set(plan["units"].values()) == {"cached"}


def test_merge_aware_scores_the_converged_sum_as_compose_and_eval_do(tiny_llama, study, tmp_path):
    """The in-memory score of the converged choice == `lorasum compose` (sum) on disk, then
    perplexity on the same validation rows."""
    from lorasum.data import make_batches
    from lorasum.data.token_cache import tokenize_cached
    from lorasum.evaluate import evaluate_batches
    from lorasum.merge_aware import select_checkpoints
    from lorasum.models import autocast_dtype, load_tokenizer
    from lorasum.study.reproduce import resolve

    files, out, _ = study
    resolved = resolve(
        out,
        "tiny",
        None,
        {
            "model": str(tiny_llama),
            "budget": "converged",
            "eval_every": 1,
            "patience": 1,
            "max_eval": 16,
            "max_epochs": 3,
            "domains": [f"{n}={p}" for n, p in files.items()],
            "cross_domain": False,
            "merge_aware": True,
        },
        False,
    )
    sources = [resolved.layout.sources[n] for n in ("arith", "colors")]
    dirs = [out / "seed-42" / "adapters" / n for n in ("arith", "colors")]
    model, tok = load_tiny(tiny_llama), load_tokenizer(str(tiny_llama))
    precision = run_precision()
    _, report = select_checkpoints(
        model, tok, dirs, sources, rows=8, max_length=64, precision=precision
    )
    compose(dirs, tmp_path / "sum")
    from peft import PeftModel

    items = [it for s in sources for it in tokenize_cached(tok, [s], "val", 64)[:8]]
    batches = make_batches(items, 32, tok.pad_token_id, shuffle=False)
    net = PeftModel.from_pretrained(model, str(tmp_path / "sum"))
    want = evaluate_batches(
        net,
        batches,
        ["arith", "colors"],
        torch.device("cpu"),
        autocast_dtype(precision, torch.device("cpu")),
    )["perplexity"]
    net.unload()
    tol = rel_tol(precision, fp32=1e-5, bf16=2e-3)
    assert report["val_perplexity_converged"] == pytest.approx(want, rel=tol)
    assert report["rows_per_domain"] == {"arith": 8, "colors": 8}
    # the base model is left as it was
    assert not any("lora" in n for n, _ in model.named_modules())


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"merge_aware": True, "budget": "epochs"}, "use it with --budget converged"),
        ({"merge_aware": "yes"}, "merge_aware: 'yes' is not true/false"),
        ({"methods": "sum,merge_aware"}, r"set merge_aware: true \(--merge-aware\)"),
    ],
)
def test_merge_aware_settings_are_checked_before_anything_runs(
    tiny_llama, tmp_path, settings, message
):
    files = _files(tmp_path)
    kw = {"budget": "converged", "eval_every": 1, "patience": 1, "max_eval": 16, **settings}
    with pytest.raises(LorasumError, match=message):
        reproduce(
            tmp_path / "x",
            preset="tiny",
            model=str(tiny_llama),
            progress=False,
            domains=[f"{n}={p}" for n, p in files.items()],
            **kw,
        )
    assert not (tmp_path / "x").exists()


def test_checkpoints_need_a_converged_run_with_snapshots(study, tmp_path):
    _, out, _ = study
    # the merged-data adapter is converged but keeps no checkpoints (it is never summed)
    with pytest.raises(LorasumError, match="merge_aware: true"):
        checkpoints(out / "seed-42" / "adapters" / "merged-arith+colors")
    plain = tmp_path / "plain"  # trained without validation: no best step at all
    plain.mkdir()
    (plain / "lorasum.json").write_text('{"metrics": {}}')
    with pytest.raises(LorasumError, match="converged budget"):
        checkpoints(plain)
