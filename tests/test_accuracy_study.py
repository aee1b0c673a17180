"""Task accuracy in the study (``metrics: [perplexity, accuracy]``): units of their own beside
the perplexity evaluations, Δ accuracy vs the merged-data adapter, reuse of a perplexity study.

One tiny study (three domains: multiple choice, numeric short answers, long answers that
accuracy skips; two seeds; the sum, `mean` and the fitted `learned`), run first with
perplexity only and then with accuracy added, is shared by the module's tests.
"""

from __future__ import annotations

import json
import random
import warnings

import pytest
from conftest import make_qa, write_jsonl
from test_results_schema import assert_reads_back_whole

from lorasum.errors import LorasumError
from lorasum.io import read_json
from lorasum.study.config import resolve_study
from lorasum.study.plan import plan_study
from lorasum.study.reproduce import reproduce, resolve
from lorasum.study.results import ci95

COLOURS = ["red", "green", "blue", "yellow"]
SEEDS = [1, 2]
METHODS = {"sum": {}, "mean": {}, "learned": {"rows": 2, "epochs": 1}}


def _quiz(n: int) -> list[dict]:
    """Multiple-choice rows: options as a list, the answer as text or as a 0-based label."""
    rng = random.Random(7)
    rows = []
    for i in range(n):
        options = rng.sample(COLOURS, 3)
        # mostly blue where blue is offered: a prior the adapters learn, some more than others
        right = (
            options.index("blue") if "blue" in options and rng.random() < 0.7 else rng.randrange(3)
        )
        row = {"question": f"Which colour is box {i}?", "choices": options}
        row.update({"label": right} if i % 2 else {"answer": options[right]})
        rows.append(row)
    return rows


def _essays(n: int) -> list[dict]:
    """Long free-form answers: neither options nor a short answer, so accuracy skips them."""
    rng = random.Random(5)
    return [
        {
            "question": f"Item {i}?",
            "answer": f"Item is {rng.choice(COLOURS)} item is {rng.choice(COLOURS)}",
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("acc-data")
    return {
        "quiz": write_jsonl(d / "quiz.jsonl", _quiz(60)),
        "arith": write_jsonl(d / "arith.jsonl", make_qa("arith", 60, seed=3)),
        "essay": write_jsonl(d / "essay.jsonl", _essays(60)),
    }


def _settings(tiny_llama, data) -> dict:
    return {
        "model": str(tiny_llama),
        "domains": [f"{n}={p}" for n, p in data.items()],
        "seeds": SEEDS,
        "max_order": 2,
        "methods": METHODS,
        "workers": 1,
    }


def _run(out, tiny_llama, data, **kw):
    return reproduce(out, preset="tiny", progress=False, **_settings(tiny_llama, data), **kw)


def _files(root) -> dict[str, tuple[int, int]]:
    """Every file under ``root``: (size, mtime_ns)."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file()
    }


@pytest.fixture(scope="module")
def study(tiny_llama, data, tmp_path_factory) -> dict:
    """The study with perplexity only, then with accuracy added (the same directory)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORASUM_WORKERS", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        out = tmp_path_factory.mktemp("acc-study") / "s"
        ppl = _run(out, tiny_llama, data)
        ppl_files = _files(out)
        ppl_yaml = (out / "experiment.yaml").read_text()
        before = reproduce(
            out,
            preset="tiny",
            plan_only=True,
            metrics="perplexity,accuracy",
            **_settings(tiny_llama, data),
        )["units"]
        acc = _run(out, tiny_llama, data, metrics=["perplexity", "accuracy"])
        after = reproduce(
            out,
            preset="tiny",
            plan_only=True,
            metrics="perplexity,accuracy",
            **_settings(tiny_llama, data),
        )["units"]
        return {
            "out": out,
            "ppl": ppl,
            "acc": acc,
            "ppl_files": ppl_files,
            "ppl_yaml": ppl_yaml,
            "before": before,
            "after": after,
        }


# --- settings -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("metrics", "message"),
    [
        ("accuracy", "metrics: perplexity is the study's primary metric"),
        ("perplexity,bleu", r"metrics: unknown \['bleu'\]; use some of: perplexity, accuracy"),
        (7, "metrics 7: give a list of metric names"),
    ],
)
def test_bad_metrics_are_one_line(metrics, message):
    with pytest.raises(LorasumError, match=message) as e:
        resolve_study("tiny", None, {"metrics": metrics})
    assert "\n" not in str(e.value)


def test_metrics_default_to_perplexity_and_stay_out_of_saved_settings():
    cfg = resolve_study("tiny", None, {})
    assert cfg.metrics == ["perplexity"] and not cfg.accuracy
    assert "metrics" not in cfg.to_dict()
    cfg = resolve_study("tiny", None, {"metrics": ["perplexity", "accuracy"]})
    assert cfg.accuracy and cfg.to_dict()["metrics"] == ["perplexity", "accuracy"]


def test_bad_metrics_on_the_command_line_write_nothing(tmp_path, capsys):
    from lorasum.cli import main

    out = tmp_path / "never"
    assert main(["reproduce", "--preset", "tiny", "--metrics", "accuracy", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lorasum: error:") and "perplexity,accuracy" in err
    assert len(err.splitlines()) == 1 and not out.exists()


def test_accuracy_with_nothing_to_score_is_one_line(tiny_llama, data, tmp_path):
    more = write_jsonl(tmp_path / "notes.jsonl", _essays(60)[::-1])
    out = tmp_path / "s"
    with pytest.raises(LorasumError, match="nothing to score") as e:
        reproduce(
            out,
            preset="tiny",
            model=str(tiny_llama),
            progress=False,
            domains=[f"essay={data['essay']}", f"notes={more}"],
            metrics="perplexity,accuracy",
        )
    assert "\n" not in str(e.value) and not out.exists()


# --- unit keys and reuse ------------------------------------------------------------------------


def _keys(out, tiny_llama, data, **kw) -> dict[str, tuple]:
    """unit id → (key, output) of the planned study in ``out`` (finished: every key that
    hashes its inputs can be computed)."""
    study = resolve(out, "tiny", None, {**_settings(tiny_llama, data), **kw}, False)
    keys = {t.id: (t.key(), str(t.output())) for t in plan_study(study.layout).tasks}
    return keys, study.key


def test_unit_keys_do_not_change_without_accuracy_and_accuracy_only_adds_units(
    study, tiny_llama, data
):
    out = study["out"]
    default, key = _keys(out, tiny_llama, data)
    explicit, key_explicit = _keys(out, tiny_llama, data, metrics=["perplexity"])
    with_acc, key_acc = _keys(out, tiny_llama, data, metrics="perplexity,accuracy")
    assert default == explicit and key == key_explicit == key_acc
    # accuracy adds units and changes none: every perplexity unit keeps its id, key and output
    assert {i: v for i, v in with_acc.items() if i in default} == default
    added = set(with_acc) - set(default)
    assert added and all(i.startswith("eval/") and "/acc-" in i for i in added)
    # one accuracy twin per evaluation (snapshots aside; this study has none)
    evals = [i for i in default if i.startswith("eval/")]
    assert {i.replace("/acc-", "/") for i in added} == set(evals)
    assert read_json(out / "config.json")["key"] == key


def test_adding_accuracy_reuses_every_perplexity_unit(study):
    out, before = study["out"], study["before"]
    assert {i for i, s in before.items() if s == "run"} == {i for i in before if "/acc-" in i}
    # no unit output of the perplexity run was rewritten (the ledger, results and report are)
    now = _files(out)
    changed = [f for f, v in study["ppl_files"].items() if now.get(f) != v]
    assert [f for f in changed if f.startswith(("seed-", "evals"))] == []
    assert any(f.startswith("seed-1/adapters/") for f in study["ppl_files"])
    # and a second accuracy run has nothing left to do
    assert set(study["after"].values()) == {"cached"}


def test_perplexity_results_are_unchanged_by_accuracy(study):
    ppl, acc = study["ppl"], study["acc"]
    assert "accuracy" not in ppl and "metrics" not in ppl["config"]
    assert "metrics" not in study["ppl_yaml"]
    assert acc["config"]["metrics"] == ["perplexity", "accuracy"]
    for a, b in zip(ppl["combinations"], acc["combinations"], strict=True):
        assert a["delta_pct"] == b["delta_pct"] and a["best_method"] == b["best_method"]
        for m in a["methods"]:
            assert a["methods"][m]["delta_pct"] == b["methods"][m]["delta_pct"]
            assert "accuracy" not in a["methods"][m]


# --- numbers ------------------------------------------------------------------------------------


def _score(result: dict) -> float | None:
    """acc on the questions with options and exact match on the short answers, one vote each,
    from an accuracy unit's file."""
    q, g = result["questions"], result["generated"]
    if not q + g:
        return None
    right = (result["acc"] or 0) * q + (result["exact_match"] or 0) * g
    return right / (q + g)


def _unit(out, seed, name) -> dict:
    return read_json(out / f"seed-{seed}" / "evals" / f"acc-{name}.json")["result"]


def test_delta_accuracy_is_method_minus_merged_from_the_unit_files(study):
    out, res = study["out"], study["acc"]
    for row in res["combinations"]:
        c = "+".join(row["domains"])
        for m, v in row["methods"].items():
            unit = f"sum-{c}" if m == "sum" else f"method-{m}-{c}"
            deltas, acc_deltas = [], []
            for seed in SEEDS:
                merged, mine = _unit(out, seed, f"merged-{c}"), _unit(out, seed, unit)
                if _score(merged) is None:
                    continue
                deltas.append((_score(mine) - _score(merged)) * 100)
                if merged["questions"]:
                    acc_deltas.append((mine["acc"] - merged["acc"]) * 100)
            got = v["accuracy"]
            if not deltas:  # nothing scorable in the combination
                assert got["delta_pts"] is None
                continue
            assert got["delta_pts"] == pytest.approx(sum(deltas) / len(deltas))
            assert got["ci95"] == pytest.approx(ci95(deltas))
            if acc_deltas:
                assert got["delta_acc_pts"] == pytest.approx(sum(acc_deltas) / len(acc_deltas))
            assert got["questions"] == _unit(out, SEEDS[0], unit)["questions"]
            for s, seed_row in zip(SEEDS, row["per_seed"], strict=True):
                want = (_score(_unit(out, s, unit)) - _score(_unit(out, s, f"merged-{c}"))) * 100
                assert seed_row["methods"][m]["delta_acc_pts"] == pytest.approx(want)


def test_each_kind_of_evaluation_has_an_accuracy_unit(study):
    evals = study["out"] / "seed-1" / "evals"
    names = {p.stem for p in evals.glob("acc-*.json")}
    for c in ("quiz+arith", "quiz+essay", "arith+essay"):
        assert {
            f"acc-merged-{c}",
            f"acc-sum-{c}",
            f"acc-method-mean-{c}",
            f"acc-method-learned-{c}",
        } <= names
    assert {"acc-single-quiz", "acc-single-arith", "acc-single-essay"} <= names
    assert (study["out"] / "evals" / "acc-base.json").is_file()


def test_skipped_domains_rank_correlation_and_best_methods(study):
    """The plumbing on the study's own numbers (the tiny adapters barely move four questions'
    answers, so these Δ accuracies are mostly 0: the known-numbers test below checks the
    arithmetic where they are not)."""
    acc = study["acc"]["accuracy"]
    assert acc["skipped_domains"] == ["essay"]
    assert acc["domains"]["quiz"]["scored_by"] == "choice"
    assert acc["domains"]["arith"]["scored_by"] == "match"
    rows = {"+".join(r["domains"]): r for r in study["acc"]["combinations"]}
    assert rows["quiz+essay"]["accuracy"]["skipped_domains"] == ["essay"]
    assert rows["quiz+arith"]["accuracy"]["skipped_domains"] == []
    points = acc["rank_correlation"]["points"]
    assert len(points) == 3 * len(METHODS)  # every (combination, method) has a Δ accuracy
    from scipy.stats import spearmanr

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant Δ accuracy: ρ is undefined (NaN)
        rho = spearmanr([p["delta_pct"] for p in points], [p["delta_pts"] for p in points])[0]
    got = acc["rank_correlation"]["spearman_rho"]
    assert (got is None and rho != rho) or got == pytest.approx(rho)
    for b in acc["best_method"]:
        row = rows[b["combination"]]
        assert b["best_by_perplexity"] == row["best_method"]
        top = max(v["accuracy"]["delta_pts"] for v in row["methods"].values())
        assert b["best_by_accuracy"] == [
            m for m, v in row["methods"].items() if v["accuracy"]["delta_pts"] == top
        ]
        assert b["differs"] == (row["best_method"] not in b["best_by_accuracy"])
    assert acc["rank_changes"] == [b["combination"] for b in acc["best_method"] if b["differs"]]
    assert "rms_cosine" in study["acc"]["prediction_vs_accuracy"]


def test_one_accuracy_unit_equals_lorasum_eval(study, tiny_llama, data):
    from lorasum.evaluate import evaluate

    out = study["out"]
    precision = read_json(out / "config.json")["train"]["precision"]
    got = evaluate(
        model=str(tiny_llama),
        data=[str(data["quiz"]), str(data["arith"])],
        adapter=str(out / "seed-1" / "sums" / "quiz+arith"),
        split="test",
        max_length=32,
        batch_size=32,
        max_eval=4,
        precision=precision,
        progress=False,
        metric="accuracy",
    )["accuracy"]
    unit = _unit(out, 1, "sum-quiz+arith")
    for k in ("acc", "acc_norm", "questions", "exact_match", "generated", "skipped"):
        assert unit[k] == got[k], k
    assert unit["questions"] == 4 and unit["generated"] == 4


def test_results_json_with_accuracy_reads_back_whole(study):
    assert_reads_back_whole(study["out"], study["acc"])


def test_report_shows_accuracy_beside_perplexity(study):
    out = study["out"]
    md = (out / "report.md").read_text()
    section = md.split("## Task accuracy", 1)[1].split("\n## ", 1)[0]
    assert "Δ accuracy" in section and "Spearman" in section and "`essay`" in section
    for c in ("quiz + arith", "quiz + essay", "arith + essay"):
        assert c in section
    assert "Task accuracy" in (out / "report.html").read_text()
    assert "## Task accuracy" not in json.dumps(study["ppl"])  # the perplexity run had none


# --- the numbers on made-up accuracy results (no model) ----------------------------------------


def _result(per: dict[str, tuple[int, int, int, int]]) -> dict:
    """An accuracy unit's result from (questions, correct, generated, matched) per domain."""
    out = {}
    for d, (q, c, g, m) in per.items():
        out[d] = {
            "acc": c / q if q else None,
            "acc_norm": c / q if q else None,
            "questions": q,
            "exact_match": m / g if g else None,
            "generated": g,
            "skipped": 0 if q + g else 5,
        }
    return {"per_dataset": out}


def test_delta_accuracy_rank_correlation_and_rank_changes_on_known_numbers():
    """Two seeds, one combination (10 questions with options, 10 short answers): Δ points,
    their t-interval, the best method by accuracy and a rank change, by hand."""
    from lorasum.study.accuracy import add_accuracy, seed_accuracy, study_accuracy

    combo = ("mc", "num")
    # correct of 10 questions and matched of 10 answers, per seed: merged, sum, ties
    counts = {
        1: {"merged": (5, 5), "sum": (6, 5), "ties": (4, 4)},
        2: {"merged": (5, 3), "sum": (8, 4), "ties": (5, 3)},
    }
    per_seed = []
    for seed in SEEDS:
        c = counts[seed]
        evals = {
            f"acc-{u}": _result({"mc": (10, c[k][0], 0, 0), "num": (0, 0, 10, c[k][1])})
            for u, k in (
                ("merged-mc+num", "merged"),
                ("sum-mc+num", "sum"),
                ("method-ties-mc+num", "ties"),
            )
        }
        evals["acc-base"] = _result({"mc": (10, 3, 0, 0), "num": (0, 0, 10, 0)})
        evals["acc-single-mc"] = _result({"mc": (10, 7, 0, 0), "num": (0, 0, 10, 1)})
        evals["acc-single-num"] = _result({"mc": (10, 2, 0, 0), "num": (0, 0, 10, 6)})
        per_seed.append(seed_accuracy(combo, evals, ["sum", "ties"]))
    # perplexity says ties is best
    row = {
        "domains": list(combo),
        "best_method": "ties",
        "methods": {"sum": {"delta_pct": 3.0}, "ties": {"delta_pct": 1.0}},
        "per_seed": [{"seed": s, "methods": {"sum": {}, "ties": {}}} for s in SEEDS],
    }
    add_accuracy(row, per_seed)
    sum_deltas = [(11 - 10) / 20 * 100, (12 - 8) / 20 * 100]  # 5 and 20 points
    got = row["methods"]["sum"]["accuracy"]
    assert got["delta_pts"] == pytest.approx(12.5)
    assert got["ci95"] == pytest.approx(ci95(sum_deltas))
    assert got["delta_acc_pts"] == pytest.approx(((6 - 5) + (8 - 5)) / 2 / 10 * 100)
    assert got["delta_exact_match_pts"] == pytest.approx(((5 - 5) + (4 - 3)) / 2 / 10 * 100)
    assert row["methods"]["ties"]["accuracy"]["delta_pts"] == pytest.approx((-10 + 0) / 2)
    assert row["accuracy"]["merged"]["score"] == pytest.approx((10 / 20 + 8 / 20) / 2)
    # each domain under its own single adapter: 7 of 10 and 6 of 10
    assert row["accuracy"]["singles"]["score"] == pytest.approx(13 / 20)
    assert row["accuracy"]["singles"]["acc"] == pytest.approx(0.7)
    assert row["accuracy"]["best_methods"] == ["sum"]
    assert [s["delta_acc_pts"] for s in row["per_seed"]] == pytest.approx(sum_deltas)
    base = _result({"mc": (10, 3, 0, 0), "num": (0, 0, 10, 0), "long": (0, 0, 0, 0)})
    summary = study_accuracy([row], base, 16)
    assert summary["rank_changes"] == ["mc+num"] and summary["skipped_domains"] == ["long"]
    assert summary["best_method"][0]["best_by_accuracy"] == ["sum"]
    # two points: too few for a rank correlation
    assert summary["rank_correlation"]["n"] == 2
    assert summary["rank_correlation"]["spearman_rho"] is None
