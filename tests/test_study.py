"""The study beyond the paper's table: methods on every combination, predictors before composing,
leave-one-out prediction, the cross-domain matrix, the paper's triple variant, statistics,
experiment files. Tiny random models, tiny data, no network."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from test_results_schema import assert_reads_back_whole

from lorasum.adapters import read_adapter
from lorasum.errors import LorasumError
from lorasum.factors import delta
from lorasum.methods import method_names
from lorasum.study.config import (
    STUDY_ONLY_METHODS,
    default_methods,
    load_preset,
    preset_names,
    resolve_study,
)
from lorasum.study.reproduce import reproduce


@pytest.fixture(scope="module")
def study(tiny_llama, qa_files, tmp_path_factory):
    """One 3-domain tiny study with a data-free and a calibration method, predictors on."""
    out = tmp_path_factory.mktemp("study") / "run"
    res = reproduce(
        out,
        preset="tiny",
        model=str(tiny_llama),
        domains=[f"{n}={p}" for n, p in qa_files.items()],
        methods="mean,regmean_rescaled",
        predictors=True,
        progress=False,
    )
    return out, res


def test_every_method_on_every_combination(study):
    out, res = study
    assert len(res["combinations"]) == 4
    for row in res["combinations"]:
        methods = row["methods"]
        assert list(methods) == ["sum", "mean", "regmean_rescaled"]
        assert methods["sum"]["ppl"] == row["ppl_sum"]
        assert methods["sum"]["delta_pct"] == pytest.approx(row["delta_pct"])
        assert methods["sum"]["category"] == "baseline"
        assert methods["mean"]["category"] == "data-free"
        assert methods["regmean_rescaled"]["category"] == "calibration"
        for m in methods.values():
            assert m["delta_pct"] == pytest.approx((m["ppl"] / row["ppl_merged"] - 1.0) * 100.0)
            assert set(m["per_domain"]) == set(row["domains"])
        assert row["best_method"] == min(methods, key=lambda k: methods[k]["delta_pct"])
        assert row["per_seed"][0]["methods"]["mean"]["ppl"] == methods["mean"]["ppl"]


def test_delta_splits_into_sum_vs_own_adapters_and_merged_gain(study):
    """(1 + Δ) = (1 + sum vs own adapters)(1 + merged gain), with the own-adapter perplexity
    rebuilt here from the single adapters' evaluation files (NLL and tokens per domain)."""
    import json
    import math

    out, res = study
    seed = out / "seed-42"
    for row in res["combinations"]:
        nll = tokens = 0.0
        for d in row["domains"]:
            ev = json.loads((seed / "evals" / f"single-{d}.json").read_text())["result"]
            nll += ev["per_dataset"][d]["nll"]
            tokens += ev["per_dataset"][d]["tokens"]
        assert row["ppl_singles"] == pytest.approx(math.exp(nll / tokens), rel=1e-9)
        assert row["delta_vs_singles_pct"] == pytest.approx(
            (row["ppl_sum"] / row["ppl_singles"] - 1) * 100
        )
        product = (1 + row["delta_vs_singles_pct"] / 100) * (1 + row["merged_gain_pct"] / 100)
        assert product == pytest.approx(1 + row["delta_pct"] / 100, rel=1e-9)
        for m in row["methods"].values():
            assert m["delta_vs_singles_pct"] == pytest.approx(
                (m["ppl"] / row["ppl_singles"] - 1) * 100
            )
    loo = res["prediction_vs_singles"]["rms_cosine"]
    per_seed = [
        (s["seed"], s["delta_vs_singles_pct"]) for r in res["combinations"] for s in r["per_seed"]
    ]
    assert [(p["seed"], p["measured"]) for p in loo["points"]] == per_seed
    report = (out / "report.md").read_text()
    assert "## What Δ% is made of" in report and "sum vs own adapters" in report


def delta_weight(f):
    return delta(f.A, f.B, f.scale)


def test_the_mean_in_the_study_is_the_mean_of_the_deltas(study):
    """The study's composed adapter for a method is what that method defines: mean of ΔW."""
    out, _ = study
    seed = out / "seed-42"
    combo = ["arith", "colors"]
    mean_dir = seed / "methods" / "mean" / "+".join(combo)
    composed = read_adapter(mean_dir).modules
    singles = [read_adapter(seed / "adapters" / d).modules for d in combo]
    for name, f in composed.items():
        expected = sum(delta_weight(s[name]) for s in singles) / len(singles)
        torch.testing.assert_close(delta_weight(f), expected, rtol=1e-5, atol=1e-6)


def test_paper_variant_is_merged_pair_plus_third_single(study):
    out, res = study
    seed = out / "seed-42"
    triple = next(r for r in res["combinations"] if len(r["domains"]) == 3)
    variants = triple["paper_variants"]
    assert {v["third"] for v in variants} == set(triple["domains"])
    for v in variants:
        assert v["delta_pct"] == pytest.approx((v["ppl"] / triple["ppl_merged"] - 1) * 100)
        name = "+".join(v["pair"]) + "+" + v["third"]
        composed = read_adapter(seed / "variants" / name).modules
        pair = read_adapter(seed / "adapters" / f"merged-{'+'.join(v['pair'])}").modules
        third = read_adapter(seed / "adapters" / v["third"]).modules
        for m, f in composed.items():
            torch.testing.assert_close(
                delta_weight(f),
                delta_weight(pair[m]) + delta_weight(third[m]),
                rtol=1e-5,
                atol=1e-6,
            )
    # pairs have no variant
    assert all("paper_variants" not in r for r in res["combinations"] if len(r["domains"]) == 2)


def test_cross_domain_matrix(study):
    _, res = study
    cd = res["cross_domain"]
    names = list(res["domains"])
    assert cd["adapters"] == ["base", *names]
    for n in names:
        # the diagonal is the single adapter on its own domain, as in the headline numbers
        assert cd["perplexity"][n][n] == pytest.approx(res["singles"][n]["perplexity"])
        assert cd["perplexity"]["base"][n] == pytest.approx(res["base"]["per_domain"][n])
        for d in names:
            change = (cd["perplexity"][n][d] / cd["perplexity"]["base"][d] - 1) * 100
            assert cd["change_vs_base_pct"][n][d] == pytest.approx(change)


def test_predictors_statistics_and_loo(study):
    from scipy import stats

    from lorasum.analysis.forecast import loo_predictions

    _, res = study
    rows = res["combinations"]
    for row in rows:
        p = row["predictors"]
        assert p["rms_cosine"] == row["rms_cosine"]
        assert {"rms_activation_cosine", "max_cross_talk", "mean_cross_talk"} <= set(p)
    st = res["statistics"]["rms_cosine"]
    xs = [r["rms_cosine"] for r in rows]
    ys = [r["delta_pct"] for r in rows]
    assert st["points"]["correlation"]["pearson_r"] == pytest.approx(stats.pearsonr(xs, ys)[0])
    assert st["points"]["fit"]["slope"] == pytest.approx(stats.linregress(xs, ys).slope)
    assert st["points"]["bootstrap"]["n_groups"] == 4
    pred = res["prediction"]["rms_cosine"]
    expected = loo_predictions(xs, ys, ["+".join(r["domains"]) for r in rows])
    assert [p["predicted"] for p in pred["points"]] == pytest.approx(expected)
    assert [p["measured"] for p in pred["points"]] == ys


def test_results_carry_manifest_curves_paper_table_and_config(study):
    out, res = study
    man = res["manifest"]
    assert man["versions"]["torch"] == torch.__version__.split("+")[0] or man["versions"]["torch"]
    kinds = {u["kind"] for u in man["units"]}
    assert {"train", "eval", "compose", "calibrate"} <= kinds
    assert set(man["splits"]) == set(res["domains"])
    assert len(res["train_curves"]) == 3 + 4
    curve = res["train_curves"]["seed-42/arith"]
    assert [s for s, _ in curve] == list(range(1, len(curve) + 1))
    assert res["paper_comparison"]["rows"][0]["paper_delta_pct"] == -9.10
    saved = yaml.safe_load((out / "experiment.yaml").read_text())
    assert saved["methods"] == {"sum": {}, "mean": {}, "regmean_rescaled": {}}
    assert saved == res["config"]
    json.dumps(res, allow_nan=False)  # strict JSON


def test_results_json_reads_back_whole_through_its_types(study):
    out, res = study
    assert_reads_back_whole(out, res)


def test_rerun_with_more_methods_reuses_everything_else(study, tiny_llama, qa_files):
    out, res = study
    weights = out / "seed-42" / "adapters" / "arith" / "adapter_model.safetensors"
    stamp = weights.stat().st_mtime_ns
    evals = out / "seed-42" / "evals" / "sum-arith+colors.json"
    eval_stamp = evals.stat().st_mtime_ns
    res2 = reproduce(
        out,
        preset="tiny",
        model=str(tiny_llama),
        domains=[f"{n}={p}" for n, p in qa_files.items()],
        methods="mean,regmean_rescaled,tsv,soft_projection,shift_match",
        predictors=True,
        progress=False,
    )
    assert weights.stat().st_mtime_ns == stamp
    assert evals.stat().st_mtime_ns == eval_stamp
    for row in res2["combinations"]:
        assert "tsv" in row["methods"]
        for name in ("soft_projection", "shift_match"):  # the new ones run in a study
            assert row["methods"][name]["category"] == "calibration"
            assert row["methods"][name]["ppl"] > 1
    assert res2["combinations"][0]["methods"]["mean"] == res["combinations"][0]["methods"]["mean"]


# --- experiment files ---------------------------------------------------------------------


def test_presets_are_valid_files():
    assert {"quick", "standard", "paper", "tiny"} <= set(preset_names())
    for name in preset_names():
        cfg = resolve_study(name)
        assert cfg.preset == name
        assert "sum" in cfg.methods
    assert load_preset("quick")["train"]["max_train"] == 48
    standard = resolve_study("standard")
    assert len(standard.seeds) >= 3 and len(standard.domains) >= 6


def test_shipped_experiment_files_are_valid():
    """experiments/*.yaml resolve, name registered methods only, and the interference study's
    file gives the settings its issue states (the key of its runs depends on them)."""
    from pathlib import Path

    files = sorted((Path(__file__).parent.parent / "experiments").glob("*.yaml"))
    assert files
    known = set(method_names()) | set(STUDY_ONLY_METHODS)
    for path in files:
        cfg = resolve_study(None, path, {})
        # each compares something beside the sum: methods, or routes (converged-policies.yaml
        # compares training policies across its runs, with the oracle route in each)
        assert set(cfg.methods) <= known and (len(cfg.methods) > 1 or cfg.routes), path.name
    cfg = resolve_study(None, files[0].parent / "interference-240.yaml", {})
    assert cfg.seeds == [1, 2, 3] and cfg.preset == "quick"
    assert {k: cfg.train[k] for k in ("max_train", "max_eval", "lr", "max_length")} == {
        "max_train": 240,
        "max_eval": 60,
        "lr": 1e-4,
        "max_length": 128,
    }


def test_config_file_then_flags(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(
        "preset: quick\ndomains: {a: math, b: medicine}\nseeds: [1, 2]\n"
        "methods: {ties: {density: 0.5}}\ntrain: {lr: 1e-3, max_train: 16}\n"
    )
    cfg = resolve_study(None, path, {"max_train": 8, "seeds": None})
    assert cfg.domains == {"a": "math", "b": "medicine"}
    assert cfg.seeds == [1, 2]
    assert cfg.methods == {"sum": {}, "ties": {"density": 0.5}}
    assert cfg.train["lr"] == 1e-3 and cfg.train["max_train"] == 8
    assert cfg.train["max_length"] == load_preset("quick")["train"]["max_length"]
    assert (
        resolve_study("quick", None, {"methods": "all"}).methods.keys()
        == {**dict.fromkeys(default_methods())}.keys()
    )


def test_config_errors_are_reported_together(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        "domians: [math]\nseeds: [1, 1]\nmethods: [sum, nosuch]\nmax_order: 1\n"
        "train: {rank: four, lr: -1, colour: blue}\n"
    )
    with pytest.raises(LorasumError) as e:
        resolve_study(None, path)
    msg = str(e.value)
    for part in (
        "'domians'",
        "repeats a seed",
        "nosuch",
        "--max-order 1",
        "train.rank",
        "'colour'",
    ):
        assert part in msg, part
    assert "\n" not in msg


def test_bad_yaml_and_missing_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("domains: [math\n")
    with pytest.raises(LorasumError, match="not valid YAML"):
        resolve_study(None, path)
    with pytest.raises(LorasumError, match="no such file"):
        resolve_study(None, tmp_path / "missing.yaml")
    with pytest.raises(LorasumError, match="unknown preset"):
        resolve_study("nosuch")


def test_cli_reproduce_with_config(tiny_llama, qa_files, tmp_path, capsys):
    from lorasum.cli import main

    path = tmp_path / "exp.yaml"
    domains = {n: str(p) for n, p in list(qa_files.items())[:2]}
    path.write_text(
        yaml.safe_dump(
            {
                "preset": "tiny",
                "model": str(tiny_llama),
                "domains": domains,
                "methods": ["mean"],
                "predictors": False,
            }
        )
    )
    out = tmp_path / "run"
    import re
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. tqdm's "clamping frac": the work total was wrong
        argv = ["reproduce", "--config", str(path), "--out", str(out), "--max-train", "6"]
        assert main(argv) == 0
    captured = capsys.readouterr()
    assert "best" in captured.out
    # the bar ends with every unit counted: 2 single + 1 merged trainings, base eval, 2 single
    # evals, merged + sum + mean evals, the sum's and the mean's composes = 11
    assert re.search(r"\b11/11 units", captured.err), captured.err[-300:]
    assert "100%" in captured.err
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["train"]["max_train"] == 6
    assert list(res["combinations"][0]["methods"]) == ["sum", "mean"]
    assert res["combinations"][0]["predictors"] == {
        "rms_cosine": res["combinations"][0]["rms_cosine"]
    }


def test_cli_flags_reach_the_study_settings():
    from lorasum.cli import build_parser

    args = build_parser().parse_args(
        ["reproduce", "--out", "x", "--predictors", "--no-cross-domain", "--methods", "all"]
    )
    assert args.predictors is True and args.cross_domain is False
    assert args.paper_variants is None  # not given: the preset's value stands
    study = resolve_study(
        "quick",
        None,
        {"predictors": args.predictors, "cross_domain": args.cross_domain, "methods": args.methods},
    )
    assert study.predictors and not study.cross_domain and study.paper_variants
    assert list(study.methods) == default_methods()


def test_calibrated_family_in_the_study(tiny_llama, qa_files, tmp_path):
    """`calibrated`: its own category, its budget stated, and the adapter it writes is
    Σ_i c_{type,i} ΔW_i with the coefficients it reports."""
    out = tmp_path / "run"
    res = reproduce(
        out,
        preset="tiny",
        model=str(tiny_llama),
        domains=[f"{n}={p}" for n, p in list(qa_files.items())[:2]],
        methods={"calibrated": {"fraction": 1.0}},
        cross_domain=False,
        progress=False,
    )
    row = res["combinations"][0]
    assert row["methods"]["calibrated"]["category"] == "calibrated"
    (budget,) = res["budget"]["calibrated"]
    merged = res["merged_training"][f"merged-{'+'.join(row['domains'])}"][0]
    assert budget["merged_training_tokens"] == merged["real_tokens"]
    assert 0 < budget["tokens"] <= budget["max_tokens"] <= merged["real_tokens"]
    assert budget["fraction"] == pytest.approx(budget["tokens"] / merged["real_tokens"])
    seed = out / "seed-42"
    composed = read_adapter(seed / "methods" / "calibrated" / "+".join(row["domains"])).modules
    singles = [read_adapter(seed / "adapters" / d).modules for d in row["domains"]]
    assert budget["granularity"] == "type"
    coefficients = budget["coefficient_values"]
    assert any(abs(c - 1.0) > 1e-6 for cs in coefficients.values() for c in cs)  # it moved
    for name, f in composed.items():
        c = coefficients[name.rsplit(".", 1)[-1]]
        expected = sum(ci * delta_weight(s[name]) for ci, s in zip(c, singles, strict=True))
        torch.testing.assert_close(delta_weight(f), expected, rtol=1e-4, atol=1e-6)


def test_calibrated_below_one_batch_is_the_sum(tiny_llama, qa_files, tmp_path):
    """At the default 1 % a tiny study's budget is below one validation batch: no step, the
    coefficients stay 1 and the composition is the sum (stated in the budget), not an error."""
    res = reproduce(
        tmp_path / "run",
        preset="tiny",
        model=str(tiny_llama),
        domains=[f"{n}={p}" for n, p in list(qa_files.items())[:2]],
        methods="calibrated",
        cross_domain=False,
        progress=False,
    )
    (budget,) = res["budget"]["calibrated"]
    assert budget["steps"] == 0 and budget["tokens"] == 0
    assert all(c == 1.0 for cs in budget["coefficient_values"].values() for c in cs)
    row = res["combinations"][0]
    assert row["methods"]["calibrated"]["ppl"] == pytest.approx(row["ppl_sum"], rel=1e-5)
