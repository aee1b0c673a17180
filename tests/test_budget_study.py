"""The study's training budget (epochs / steps / converged) and snapshots along the runs."""

from __future__ import annotations

import pytest
from conftest import make_qa, write_jsonl
from test_results_schema import assert_reads_back_whole

from lorasum.analysis.statistics import delta_pct
from lorasum.errors import LorasumError
from lorasum.io import read_json
from lorasum.study.config import resolve_study
from lorasum.study.reproduce import reproduce
from lorasum.training import patience_stop


def _domains(qa_files) -> list[str]:
    return [f"{n}={p}" for n, p in qa_files.items()]


def _run(tiny_llama, qa_files, out, **kw):
    return reproduce(
        out, preset="tiny", model=str(tiny_llama), domains=_domains(qa_files), progress=False, **kw
    )


def test_steps_budget_gives_every_adapter_of_a_combination_the_merged_steps(
    tiny_llama, qa_files, tmp_path
):
    res = _run(tiny_llama, qa_files, tmp_path / "s", budget="steps")
    assert res["training_budget"]["name"] == "steps"
    rows = res["training_budget"]["combinations"]
    assert len(rows) == 4  # three pairs and the triple
    for row in rows:
        for p in row["per_seed"]:
            # read the adapters' own markers, not the summary's copy
            seed_dir = tmp_path / "s" / f"seed-{p['seed']}" / "adapters"
            merged = read_json(seed_dir / f"merged-{row['combination']}" / "lorasum.json")
            singles = [read_json(seed_dir / u / "lorasum.json") for u in row["singles"]]
            steps = {m["metrics"]["steps"] for m in singles}
            assert steps == {merged["metrics"]["steps"]}
    # the triple takes more steps than the pairs, so each domain has a second single adapter
    triple = rows[-1]
    assert all("@" in u for u in triple["singles"])
    assert triple["single_steps_mean"][0] > rows[0]["single_steps_mean"][0]
    # the sum composes exactly those adapters
    marker = read_json(tmp_path / "s" / "seed-42" / "sums" / triple["combination"] / "lorasum.json")
    assert [s.rsplit("/", 1)[-1] for s in marker["sources"]] == triple["singles"]


def test_converged_budget_records_curves_and_reports_what_stopped_each_adapter(
    tiny_llama, tmp_path, monkeypatch
):
    monkeypatch.setenv("LORASUM_PRECISION", "fp32")
    # 160 rows per domain: validation splits of 16, the fewest a patience stop may use
    files = {
        n: write_jsonl(tmp_path / f"{n}.jsonl", make_qa(n, 160, seed=i))
        for i, n in enumerate(("arith", "colors"))
    }
    out = tmp_path / "c"
    # 2 steps per epoch for a single adapter, 4 for the merged one: a cap of 5 epochs is
    # 10 and 20 steps, which some adapters' curves outlast and others do not
    res = _run(
        tiny_llama,
        files,
        out,
        budget="converged",
        eval_every=1,
        patience=1,
        max_eval=16,
        max_epochs=5,
        cross_domain=False,
    )
    cfg = read_json(out / "config.json")
    assert cfg["budget"] == "converged"
    assert cfg["train"]["schedule"] == "constant"
    adapters = out / "seed-42" / "adapters"
    ended = {"patience": 0, "cap": 0}
    for unit, (summary,) in res["training_budget"]["adapters"].items():
        metrics = read_json(adapters / unit / "lorasum.json")["metrics"]
        losses = [p["val_loss"] for p in metrics["val_curve"]]
        assert losses, unit
        best, stop = patience_stop(losses, 1)
        assert metrics["best_step"] == metrics["val_curve"][best]["step"]
        by_patience = stop is not None and metrics["steps"] < metrics["schedule_steps"]
        assert metrics["stopped_early"] == by_patience
        assert metrics["stopped_by"] == ("patience" if by_patience else "cap")
        assert metrics["stop_step"] == metrics["steps"] == metrics["val_curve"][-1]["step"]
        assert metrics["schedule"] == "constant"
        # results.json gives each adapter the same record
        for k in ("stop_step", "best_step", "stopped_by", "schedule"):
            assert summary[k] == metrics[k], (unit, k)
        ended[metrics["stopped_by"]] += 1
    assert sum(ended.values()) == 3  # 2 singles and the merged pair
    assert ended["patience"] >= 1 and ended["cap"] >= 1, ended
    report = (out / "report.md").read_text()
    section = report.split("## Training budget", 1)[1]
    assert (
        f"Of the 3 adapter trainings, {ended['patience']} were stopped by patience"
        f" (the validation loss stopped improving) and {ended['cap']} by the cap"
    ) in section
    assert "| adapter | seed | stop step | best step | stopped by | schedule |" in section
    m = res["training_budget"]["adapters"]["merged-arith+colors"][0]
    row = f"| merged-arith+colors | 42 | {m['stop_step']} | {m['best_step']} | {m['stopped_by']} |"
    assert row in section


def test_snapshots_pair_by_equal_epochs_and_equal_steps_and_are_reused(
    tiny_llama, qa_files, tmp_path
):
    out = tmp_path / "snap"
    res = _run(tiny_llama, qa_files, out, snapshots="0.5,1,2", methods="sum,tsv")
    snap = res["snapshots"]
    assert snap["epochs"] == [0.5, 1.0, 2.0] and snap["methods"] == ["sum", "tsv"]
    evals = out / "seed-42" / "evals"
    pair = next(r for r in snap["combinations"] if r["combination"] == "arith+colors")
    # equal epochs at 1: the sum of the singles' 1-epoch snapshots vs the merged 1-epoch one
    at1 = next(p for p in pair["equal_epochs"] if p["epochs"] == 1.0)
    ppl_sum = read_json(evals / "snap-1ep-sum-arith+colors.json")["result"]["perplexity"]
    ppl_merged = read_json(evals / "snap-1ep-merged-arith+colors.json")["result"]["perplexity"]
    assert at1["delta_pct"]["sum"]["mean"] == pytest.approx(delta_pct(ppl_sum, ppl_merged))
    # equal steps: each point's singles' snapshots really have the merged snapshot's step
    assert pair["equal_steps"], "a pair of equal-sized domains pairs singles at 2e with merged e"
    adapters = out / "seed-42" / "adapters"
    for p in pair["equal_steps"]:
        assert p["single_epochs"] == 2 * p["merged_epochs"]
        for unit in ("arith", "colors", "merged-arith+colors"):
            steps = [
                read_json(d / "lorasum.json")["step"]
                for d in (adapters / unit / "snapshots").iterdir()
            ]
            final = read_json(adapters / unit / "lorasum.json")["metrics"]["steps"]
            assert p["steps"] in steps + [final]
    assert_reads_back_whole(out, res)  # snapshots included
    report = (out / "report.md").read_text()
    assert "## Training budget" in report and "figures/delta_vs_length.png" in report
    assert (out / "figures" / "delta_vs_length.png").stat().st_size > 1000
    # rerun: every unit is finished, so the plan runs nothing
    plan = _run(tiny_llama, qa_files, out, snapshots="0.5,1,2", methods="sum,tsv", plan_only=True)
    assert set(plan["units"].values()) == {"cached"}
    assert "nothing to run" in plan["plan"]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"budget": "forever"}, "--budget 'forever'"),
        # the tiny preset keeps 4 validation rows per domain: too few to stop on
        ({"budget": "converged"}, r"at least 16 validation rows; arith has 4 \(.*--max-eval 4\)"),
        ({"budget": "steps", "snapshots": "0.5,1"}, "use them with --budget epochs"),
        ({"eval_every": 2}, "use --budget converged"),
        ({"snapshots": "1"}, "at least two epochs"),
        ({"snapshots": "0,1"}, "must be > 0"),
        ({"snapshots": "a,b"}, "give epochs as numbers"),
    ],
)
def test_budget_settings_are_checked_before_anything_runs(
    tiny_llama, qa_files, tmp_path, settings, message
):
    with pytest.raises(LorasumError, match=message):
        _run(tiny_llama, qa_files, tmp_path / "x", **settings)
    assert not (tmp_path / "x").exists()


def test_budget_in_experiment_files_and_defaults():
    study = resolve_study("tiny", overrides={"budget": "converged"})
    assert study.budget == "converged"
    assert study.train["eval_every"] > 0 and study.train["max_epochs"] == 10.0
    assert study.train["schedule"] == "constant"
    linear = resolve_study("tiny", overrides={"budget": "converged", "schedule": "linear"})
    assert linear.train["schedule"] == "linear"
    study = resolve_study("tiny", overrides={"snapshots": [0.25, 2, 1]})
    assert study.snapshots == [0.25, 1.0, 2.0] and study.train["epochs"] == 2.0
    assert resolve_study("tiny").budget == "epochs"


def test_cli_budget_flags(tiny_llama, qa_files, tmp_path, capsys):
    from lorasum.cli import main

    args = [
        "reproduce",
        "--preset",
        "tiny",
        "--model",
        str(tiny_llama),
        "--out",
        str(tmp_path / "p"),
    ]
    args += ["--domains", ",".join(_domains(qa_files)), "--budget", "steps", "--plan"]
    assert main([*args, "--snapshots", "0.5,1"]) != 0
    assert "use them with --budget epochs" in capsys.readouterr().err
    assert main(args) == 0
    assert "train" in capsys.readouterr().out
    assert not (tmp_path / "p").exists()


def test_study_predictors_include_the_adapter_free_ones(tiny_llama, qa_files, tmp_path):
    from lorasum.analysis.predictors.data import data_predictors
    from lorasum.analysis.predictors.transfer import transfer_predictor
    from lorasum.models import load_model, load_tokenizer

    res = _run(tiny_llama, qa_files, tmp_path / "p", predictors=True, cross_domain=True)
    res_combos = [tuple(r["domains"]) for r in res["combinations"]]
    model, tok = load_model(str(tiny_llama), "cpu"), load_tokenizer(str(tiny_llama))
    from lorasum.study.reproduce import resolve

    study = resolve(
        tmp_path / "p",
        "tiny",
        None,
        {"model": str(tiny_llama), "domains": _domains(qa_files), "predictors": True},
        False,
    )
    data = data_predictors(
        model,
        tok,
        study.layout.sources,
        res_combos,
        study.layout.base_cfg.max_length,
        model_spec=str(tiny_llama),
        cache=False,
    )
    seed_rows = {r["domains"][0] + "+" + "+".join(r["domains"][1:]): r for r in res["combinations"]}
    table = {**res["cross_domain"]["perplexity"]}
    transfer = transfer_predictor(table, res_combos)
    for name, row in seed_rows.items():
        got = row["per_seed"][0]["predictors"]
        for k, v in data[name].items():
            assert got[k] == pytest.approx(v, rel=1e-5), k
        assert got["transfer"] == pytest.approx(transfer[name]["transfer"], rel=1e-9)
    for k in ("grad_cosine_rms", "base_loss_mean", "transfer", "rms_cosine"):
        assert k in res["prediction"] and "oracle_rho" in res["prediction"][k]


def test_compare_budgets_pools_points_and_leaves_a_combination_out_everywhere():
    from lorasum.study.budget import compare_budgets

    def study(offset: float) -> dict:
        rows = []
        for i, c in enumerate((("a", "b"), ("a", "c"), ("b", "c"), ("a", "d"))):
            per_seed = [
                {
                    "seed": s,
                    "delta_pct": 2.0 * i + offset + 0.1 * s,
                    "predictors": {"x": i + 0.01 * s},
                }
                for s in (1, 2)
            ]
            rows.append(
                {
                    "domains": list(c),
                    "delta_pct": 2.0 * i + offset,
                    "methods": {},
                    "per_seed": per_seed,
                    "ci95": {"delta_pct": [0.0, 1.0]},
                }
            )
        return {"combinations": rows, "prediction": {"x": {"spearman_rho": 1.0}}}

    table = compare_budgets({"epochs": study(5.0), "steps": study(-5.0)})
    assert table["budgets"] == ["epochs", "steps"]
    assert table["combinations"]["a+b"]["steps"]["sum"]["delta_pct"] == -5.0
    pred = table["prediction"]["x"]
    assert pred["epochs"] == 1.0 and pred["pooled_n"] == 16
    # pooled, the budget offset (±5) is noise the predictor cannot see: ρ well below 1
    assert pred["pooled"] is not None and pred["pooled"] < 0.9
    assert pred["pooled_oracle_rho"] == pytest.approx(1.0, abs=0.05)
