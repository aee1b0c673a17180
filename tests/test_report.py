"""The study report: every section from a full synthetic results.json, older results with
notes, a self-contained HTML whose images all decode, `lorasum report`, and (where Chromium is
installed) a rendered screenshot that is not blank."""

from __future__ import annotations

import base64
import io
import itertools
import json
import math
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import stats as sps

from lorasum.analysis import forecast
from lorasum.analysis.statistics import (
    correlation,
    delta_pct,
)
from lorasum.cli import main
from lorasum.report import plots
from lorasum.report.blocks import Note, Para, Table
from lorasum.report.build import rebuild_report, write_report
from lorasum.report.findings import what_this_means
from lorasum.report.sections import (
    _budget,
    _curves,
    _decomposition,
    _headline,
    _methods,
    _scatter,
    _split,
)
from lorasum.study import results as study_results
from lorasum.study.budget import budget_summary

DOMAINS = ["math", "medicine", "finance"]
SEEDS = [1, 2, 3]
PREDICTORS = ["rms_cosine", "rms_activation_cosine", "max_cross_talk"]
METHODS = {"sum": "baseline", "mean": "data-free", "ties": "data-free", "regmean": "calibration"}
NEW_FIELDS = [
    "statistics",
    "cross_domain",
    "prediction",
    "paper_comparison",
    "manifest",
    "train_curves",
    "budget",
    "config",
    "training_budget",
    "snapshots",
]
EVERY_FIGURE = {
    "delta_vs_rms_cosine",
    "delta_vs_rms_activation_cosine",
    "delta_vs_max_cross_talk",
    "cosine_heatmap",
    "cross_domain",
    "train_curves",
    "per_domain",
    "predicted_vs_measured",
    "delta_vs_length",
}


def _mean(v):
    return sum(v) / len(v)


def _ci95(v):
    m, sd = _mean(v), float(np.std(v, ddof=1))
    half = float(sps.t.ppf(0.975, len(v) - 1)) * sd / math.sqrt(len(v))
    return [m - half, m + half]


def full_results(domains: list[str] = DOMAINS, max_order: int | None = None) -> dict:
    """A 3-seed study with every field of the results contract (by default the paper's three
    domains, all pairs and the triple), its numbers made consistent the way the study makes
    them (Δ% from the perplexities, means and t-intervals over seeds, statistics from
    lorasum.analysis.statistics, Δ% rising with RMS cosine)."""
    slope = 40.0
    rng = np.random.default_rng(0)
    base = {"math": 18.0, "medicine": 105.0, "finance": 44.0}
    base = {d: base.get(d, 20.0 + 5 * i) for i, d in enumerate(domains)}
    known = {("math", "medicine"): 0.27, ("math", "finance"): 0.10, ("medicine", "finance"): 0.06}
    true_cos = {
        (a, b): known.get((a, b), 0.05 + 0.25 * rng.random())
        for a, b in itertools.combinations(domains, 2)
    }
    DOMAINS = domains  # noqa: N806  (the rest of the builder reads the study's domains)
    pairs, cos = [], {}
    for s in SEEDS:
        for (a, b), c in true_cos.items():
            v = c + 0.01 * rng.standard_normal()
            cos[(s, a, b)] = cos[(s, b, a)] = v
            pairs.append(
                {
                    "seed": s,
                    "a": a,
                    "b": b,
                    "rms_cosine": v,
                    "global_cosine": v / 2,
                    "modules": {"l0.q": v * 1.2, "l0.v": -v * 0.7},
                }
            )
    top = len(domains) if max_order is None else max_order
    combos = [c for k in range(2, top + 1) for c in itertools.combinations(domains, k)]
    rows = []
    for combo in combos:
        per_seed = []
        for s in SEEDS:
            pc = [cos[(s, a, b)] for a, b in itertools.combinations(combo, 2)]
            rms = math.sqrt(_mean([c * c for c in pc]))
            preds = {
                "rms_cosine": rms,
                "rms_activation_cosine": 0.8 * rms + 0.02,
                "max_cross_talk": max(pc),
            }
            merged = _mean([base[d] for d in combo]) * 0.4 * (1 + 0.02 * rng.standard_normal())
            d = slope * rms - 3.0 + rng.standard_normal()
            methods = {}
            for k, (m, cat) in enumerate(METHODS.items()):
                ppl = merged * (1 + d / 100) if m == "sum" else merged * (1 + (d - 2 * k) / 100)
                methods[m] = {
                    "ppl": ppl,
                    "delta_pct": delta_pct(ppl, merged),
                    "category": cat,
                    "ci95": None,
                    "per_domain": {x: base[x] * 0.4 for x in combo},
                }
            singles = merged * (1.1 + 0.5 * rms)  # merged training gains more where cos is high
            per_seed.append(
                {
                    "seed": s,
                    "ppl_sum": methods["sum"]["ppl"],
                    "ppl_merged": merged,
                    "ppl_base": _mean([base[x] for x in combo]),
                    "delta_pct": methods["sum"]["delta_pct"],
                    "ppl_singles": singles,
                    "delta_vs_singles_pct": delta_pct(methods["sum"]["ppl"], singles),
                    "merged_gain_pct": delta_pct(singles, merged),
                    "rms_cosine": rms,
                    "predictors": preds,
                    "methods": methods,
                }
            )
        keys = (
            "ppl_sum",
            "ppl_merged",
            "ppl_base",
            "delta_pct",
            "rms_cosine",
            "ppl_singles",
            "delta_vs_singles_pct",
            "merged_gain_pct",
        )
        row = {"domains": list(combo), **{k: _mean([p[k] for p in per_seed]) for k in keys}}
        row["ci95"] = {k: _ci95([p[k] for p in per_seed]) for k in keys if k != "ppl_base"}
        row["tokens"] = 400
        row["per_domain"] = {
            x: {
                "ppl_sum": base[x] * 0.45,
                "ppl_merged": base[x] * 0.4,
                "ppl_base": base[x],
                "ppl_single": base[x] * 0.42,
                "delta_pct": 12.5,
            }
            for x in combo
        }
        row["per_seed"] = per_seed
        row["predictors"] = {n: _mean([p["predictors"][n] for p in per_seed]) for n in PREDICTORS}
        row["methods"] = {
            m: {
                "ppl": _mean([p["methods"][m]["ppl"] for p in per_seed]),
                "delta_pct": _mean([p["methods"][m]["delta_pct"] for p in per_seed]),
                "category": cat,
                "ci95": _ci95([p["methods"][m]["delta_pct"] for p in per_seed]),
                "per_domain": {x: base[x] * 0.4 for x in combo},
            }
            for m, cat in METHODS.items()
        }
        row["best_method"] = min(row["methods"], key=lambda m: row["methods"][m]["ppl"])
        if len(combo) == 3:
            row["paper_variants"] = [
                {
                    "pair": [a, b],
                    "third": c,
                    "ppl": row["ppl_merged"] * (1.01 + 0.01 * i),
                    "delta_pct": 1.0 + i,
                    "ci95": [0.5 + i, 1.5 + i],
                }
                for i, (a, b, c) in enumerate(
                    [
                        (combo[0], combo[1], combo[2]),
                        (combo[0], combo[2], combo[1]),
                        (combo[1], combo[2], combo[0]),
                    ]
                )
            ]
        rows.append(row)
    points = [(p["rms_cosine"], p["delta_pct"]) for r in rows for p in r["per_seed"]]
    # the study's own producers of these fields (fewer bootstrap resamples, for speed)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(study_results, "BOOTSTRAP_RESAMPLES", 300)
        statistics = study_results.statistics(rows)
        prediction = forecast.loo_prediction(rows)
        prediction_vs_singles = forecast.loo_prediction(rows, "delta_vs_singles_pct")
    train_config = {
        "model": "default",
        "rank": 4,
        "alpha": 64.0,
        "dropout": 0.1,
        "target_modules": "auto",
        "epochs": 1.0,
        "max_steps": 0,
        "lr": 2e-4,
        "warmup_steps": 2,
        "weight_decay": 0.01,
        "batch_size": 8,
        "max_length": 64,
        "split_seed": 42,
        "max_train": 48,
        "max_eval": 24,
        "answer_only": True,
    }
    adapters = ["base", *DOMAINS]
    fingerprint = {
        d: {
            "origin": f"builtin:{d}",
            "train": {"n": 48, "sha256": f"tr{d}"},
            "val": {"n": 24, "sha256": f"va{d}"},
            "test": {"n": 24, "sha256": f"te{d}"},
        }
        for d in DOMAINS
    }
    train = {
        "steps": 6,
        "train_rows": 48,
        "real_tokens": 2000,
        "answer_tokens": 300,
        "final_loss": 2.2,
        "first_loss": 2.5,
        "seconds": 20.0,
        "tokens_per_second": 90.0,
        "precision": "fp32",
        "device": "cpu",
    }
    units = [f"{d}" for d in DOMAINS] + [f"merged-{'+'.join(c)}" for c in combos]
    return {
        "lorasum_version": "0.1.0",
        "preset": "quick",
        "model": "default",
        "domains": {d: d for d in DOMAINS},
        "seeds": SEEDS,
        "seed_per_domain": False,
        "max_order": None,
        "train_config": train_config,
        "data": fingerprint,
        "base": {"per_domain": base},
        "singles": {
            d: {
                "perplexity": base[d] * 0.42,
                "tokens": 150,
                "train": [{"seed": s, **train} for s in SEEDS],
            }
            for d in DOMAINS
        },
        "merged_training": {
            f"merged-{'+'.join(c)}": [{"seed": s, **train, "steps": 6 * len(c)} for s in SEEDS]
            for c in combos
        },
        "pairs": pairs,
        "combinations": rows,
        "correlation": correlation([x for x, _ in points], [y for _, y in points]),
        "correlation_of_means": correlation(
            [r["rms_cosine"] for r in rows], [r["delta_pct"] for r in rows]
        ),
        "wall_seconds": 1234.5,
        "statistics": statistics,
        "cross_domain": {
            "adapters": adapters,
            "domains": DOMAINS,
            "perplexity": {
                a: {d: base[d] * (1.0 if a == "base" else 0.4 if d in a else 1.3) for d in DOMAINS}
                for a in adapters
            },
        },
        "prediction": prediction,
        "prediction_vs_singles": prediction_vs_singles,
        "paper_comparison": study_results.paper_comparison(rows, "default", train_config),
        "manifest": {
            "versions": {"lorasum": "0.1.0", "torch": "2.13.0", "python": "3.11.2"},
            "hardware": {"cpu": "Test CPU", "cores": 2, "device": "cpu", "torch_threads": 2},
            "seeds": SEEDS,
            "splits": fingerprint,
            "units": [
                {"unit": u, "seed": s, "kind": "train", "seconds": 20.0 + i}
                for s in SEEDS
                for i, u in enumerate(units)
            ]
            + [{"unit": "eval-base", "seed": None, "kind": "eval", "seconds": 5.0}],
            "wall_seconds": 1234.5,
        },
        "train_curves": {
            f"seed-{s}/{u}": [[k + 1, 3.0 - 0.1 * k + 0.05 * s] for k in range(12)]
            for s in SEEDS
            for u in units
        },
        "budget": {
            "token_policy": "equal tokens per domain",
            "methods": "zero gradient steps",
        },
        "config": {"preset": "quick", "seeds": SEEDS},
        "training_budget": budget_summary(
            "epochs",
            "every adapter takes one pass",
            combos,
            {c: list(c) for c in combos},
            {
                s: {
                    u: {
                        "seed": s,
                        **train,
                        "steps": 6 * (u.count("+") + 1) if u.startswith("merged-") else 6,
                    }
                    for u in units
                }
                for s in SEEDS
            },
        ),
        "snapshots": _snapshots(combos, rows),
    }


def _snapshots(combos, rows) -> dict:
    """Δ% along the runs: at 0.5 epochs 2 points lower than at 1 (the finished adapters)."""

    def point(x: float, key: str, value: float) -> dict:
        return {
            key: x,
            "delta_pct": {
                "sum": {"mean": value, "ci95": [value - 1, value + 1], "n": 3},
                "tsv": {"mean": value - 3, "ci95": None, "n": 3},
            },
        }

    out = []
    for c, r in zip(combos, rows, strict=True):
        d = r["delta_pct"]
        out.append(
            {
                "combination": "+".join(c),
                "equal_epochs": [point(0.5, "epochs", d - 2), point(1.0, "epochs", d)],
                "equal_steps": [
                    {**point(6, "steps", d - 8), "single_epochs": 1.0, "merged_epochs": 0.5}
                ],
            }
        )
    return {"epochs": [0.5, 1.0], "methods": ["sum", "tsv"], "combinations": out}


def old_results() -> dict:
    """The same study as an older results.json: none of the fields added since."""
    res = full_results()
    for k in NEW_FIELDS:
        res.pop(k)
    for r in res["combinations"]:
        for k in ("predictors", "methods", "best_method", "paper_variants"):
            r.pop(k, None)
        for p in r["per_seed"]:
            p.pop("predictors")
            p.pop("methods")
    return res


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if "id" in a:
            self.ids.add(a["id"])


def _parse(path: Path) -> _Collect:
    p = _Collect()
    p.feed(path.read_text())
    p.close()
    return p


def _md_sections(md: str) -> dict[str, str]:
    """report.md's sections: title -> text."""
    parts = md.split("\n## ")[1:]
    return {p.split("\n", 1)[0]: p.split("\n", 1)[1] for p in parts}


def _notes(md: str) -> dict[str, list[str]]:
    out = {}
    for title, text in _md_sections(md).items():
        notes = [line for line in text.splitlines() if line.startswith("> Note: ")]
        if notes:
            out[title] = notes
    return out


@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
    """The full synthetic study, its report written once for the tests that read it."""
    out = tmp_path_factory.mktemp("full")
    res = full_results()
    return res, write_report(res, out)


def test_full_results_fill_every_section(full_report):
    res, paths = full_report
    out = paths["markdown"].parent
    md = paths["markdown"].read_text()
    sections = _md_sections(md)
    assert _notes(md) == {}  # every section has what it needs
    assert {p.stem for p in (out / "figures").iterdir()} == EVERY_FIGURE
    for name in EVERY_FIGURE:
        assert f"](figures/{name}.png)" in md
    assert paths["plot"].read_bytes() == (out / "figures" / "delta_vs_rms_cosine.png").read_bytes()
    assert len(sections) == 17
    ids = _parse(paths["html"]).ids
    assert {
        "settings",
        "headline",
        "meaning",
        "paper",
        "scatter",
        "methods",
        "prediction",
        "decomposition",
        "variants",
        "cosine",
        "cross",
        "per-domain",
        "curves",
        "budget",
        "data",
        "manifest",
    } <= ids
    # headline: every combination's Δ% with its 95 % interval
    for r in res["combinations"]:
        lo, hi = r["ci95"]["delta_pct"]
        assert f"{r['delta_pct']:+.2f} [{lo:+.2f}, {hi:+.2f}]" in md
    # the statistics caption: r and ρ with their bootstrap intervals, slope ± SE
    boot = res["statistics"]["rms_cosine"]["points"]["bootstrap"]
    fit = res["statistics"]["rms_cosine"]["points"]["fit"]
    assert f"Pearson r = {boot['pearson_r']:.2f} [{boot['pearson_low']:.2f}," in md
    assert f"Spearman ρ = {boot['spearman_rho']:.2f} [" in md
    assert f"slope {fit['slope']:.2f} ± {fit['slope_stderr']:.2f} (SE)" in md
    # predicted vs measured: next to the predictors' ρ, what knowing each combination's mean
    # Δ% exactly would score (computed here from the per-seed rows)
    ys = [s["delta_pct"] for r in res["combinations"] for s in r["per_seed"]]
    means = [
        float(np.mean([s["delta_pct"] for s in r["per_seed"]]))
        for r in res["combinations"]
        for _ in r["per_seed"]
    ]
    oracle = sps.spearmanr(means, ys).statistic
    for p in res["prediction"].values():
        assert p["oracle_rho"] == pytest.approx(oracle, abs=1e-12)
    assert f"nothing of each seed's luck would reach ρ = {oracle:.2f};" in md
    # the manifest: versions, hardware, split hashes, every unit's time
    manifest = sections["Run manifest"]
    for d in DOMAINS:
        assert f"`te{d}`" in manifest
    assert "Test CPU" in manifest and "`torch` 2.13.0" in manifest
    assert manifest.count("| train |") == len(res["manifest"]["units"]) - 1
    # paper variants: one row per variant of the triple
    variants = sections["Triples: the paper's variants"]
    for v in res["combinations"][3]["paper_variants"]:
        assert f"merged-data {' + '.join(v['pair'])} + single {v['third']}" in variants
    # the paper's comparison and differences as given
    for line in res["paper_comparison"]["differences"]:
        assert line.split(";")[0] in sections["The paper vs this run"]
    assert "| math + medicine | -9.10 |" in sections["The paper vs this run"]


def test_method_table_marks_the_lowest_perplexity_per_combination():
    res = full_results()
    # make a different method best on the triple than on the pairs
    triple = res["combinations"][3]
    triple["methods"]["mean"]["ppl"] = 0.5 * min(v["ppl"] for v in triple["methods"].values())
    del triple["best_method"]  # the report falls back to the lowest ppl
    # an interval that does not hold the Δ% (one of the perplexity, say) is not shown beside it
    triple["methods"]["ties"]["ci95"] = [20.0, 30.0]
    table = next(b for b in _methods(res) if isinstance(b, Table))
    ties = next(r for r in table.rows if r[0] == "ties")
    assert "[" not in ties[5] and "[" in ties[2]
    for j, row in enumerate(res["combinations"]):
        best = min(row["methods"], key=lambda m: row["methods"][m]["ppl"])
        marked = [i for i, c in table.marked if c == j + 2]
        assert [table.rows[i][0] for i in marked] == [best]
        assert table.rows[marked[0]][j + 2].startswith("★")
        assert sum(r[j + 2].startswith("★") for r in table.rows) == 1


def test_what_this_means_follows_the_numbers():
    res = full_results()
    meaning = what_this_means(res)[0].text
    pairs = [r for r in res["combinations"] if len(r["domains"]) == 2]
    worst = max(pairs, key=lambda r: r["delta_pct"])
    best = min(pairs, key=lambda r: r["delta_pct"])
    assert f"**{' + '.join(worst['domains'])}** interferes most" in meaning
    assert f"**{' + '.join(best['domains'])}** least" in meaning
    deltas = [r["delta_pct"] for r in res["combinations"]]
    assert f"Δ% averages {sum(deltas) / len(deltas):+.1f} %" in meaning
    best_variant = min(res["combinations"][3]["paper_variants"], key=lambda v: v["delta_pct"])
    assert (
        f"merged-data {' + '.join(best_variant['pair'])} + single {best_variant['third']}, "
        f"gives {best_variant['delta_pct']:+.1f} %"
    ) in meaning
    boot = res["statistics"]["rms_cosine"]["points"]["bootstrap"]
    assert f"over {boot['n']} points in {boot['n_groups']} combinations" in meaning
    lo, hi = boot["pearson_low"], boot["pearson_high"]
    assert ("supports" in meaning) == (lo > 0)
    assert ("neither confirm nor refute" in meaning) == (lo <= 0 <= hi)
    # an interval across 0, then one below 0: the verdict changes with it
    boot.update(pearson_r=0.3, pearson_low=-0.2, pearson_high=0.7)
    assert "neither confirm nor refute" in what_this_means(res)[0].text
    boot.update(pearson_r=-0.8, pearson_low=-0.95, pearson_high=-0.4)
    text = what_this_means(res)[0].text
    assert "falls with RMS cosine" in text and "contradicts" in text
    # the best merge method is counted over the combinations
    wins = sum(r["best_method"] == "regmean" for r in res["combinations"])
    assert f"`regmean` is best on {wins} of 4 combinations" in text


def _check_images(html_path: Path, n_figures: int) -> None:
    """Every <img> is an embedded PNG that decodes, small; nothing is loaded from elsewhere."""
    parsed = _parse(html_path)
    imgs = [a for t, a in parsed.tags if t == "img"]
    assert len(imgs) == n_figures
    for a in imgs:
        head, _, data = a["src"].partition(",")
        assert head == "data:image/png;base64"
        png = base64.b64decode(data, validate=True)
        assert len(png) < 150_000  # small figures
        with Image.open(io.BytesIO(png)) as im:
            im.verify()
        with Image.open(io.BytesIO(png)) as im:
            assert im.format == "PNG" and min(im.size) > 100
    for tag, a in parsed.tags:
        assert tag not in ("script", "link", "iframe")
        for attr in ("src", "href"):
            if attr in a:
                assert a[attr].startswith(("data:", "#")), (tag, a[attr])
    assert "url(" not in html_path.read_text()  # no CSS that loads anything


def test_html_is_self_contained_and_every_image_decodes(full_report):
    _check_images(full_report[1]["html"], len(EVERY_FIGURE))


def test_many_combinations_stay_readable_and_small():
    # 6 domains, 15 pairs: more than a legend or a panel per unit can carry
    domains = ["math", "medicine", "finance", "nq", "siqa", "obqa"]
    res = full_results(domains, max_order=2)
    assert len(res["combinations"]) == 15 > plots.MANY
    figures = [
        plots.delta_vs_predictor(res, "rms_cosine"),
        plots.per_domain_bars(res),
        plots.train_curves(res["train_curves"]),
        plots.predicted_vs_measured(res["prediction"], plots.combo_colors(res)),
    ]
    for png in figures:
        assert len(png) < 150_000
        with Image.open(io.BytesIO(png)) as im:
            assert im.format == "PNG" and min(im.size) > 100
    # the method table turns: one row per combination, one column per method
    table = next(b for b in _methods(res) if isinstance(b, Table))
    assert table.header[:3] == ["combination", "sum (baseline)", "mean (data-free)"]
    assert len(table.rows) == 15
    assert sum(c.startswith("★") for row in table.rows for c in row) == 15


def test_older_results_render_with_a_note_per_missing_section(tmp_path):
    res = old_results()
    (tmp_path / "results.json").write_text(json.dumps(res))
    # training logs beside the results stand in for `train_curves`
    log = tmp_path / "seed-1" / "adapters" / "math" / "train_log.jsonl"
    log.parent.mkdir(parents=True)
    log.write_text(
        "".join(json.dumps({"step": k, "loss": 3.0 - 0.1 * k}) + "\n" for k in range(1, 7))
    )
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "delta_vs_gone.png").write_bytes(b"from an earlier report")
    paths = rebuild_report(tmp_path)
    md = paths["markdown"].read_text()
    notes = _notes(md)
    assert set(notes) == {
        "Δ% against the predictors",
        "Merge methods × combinations",
        "Predicted vs measured Δ%",
        "Triples: the paper's variants",
        "Cross-domain perplexity",
        "Training budget",
        "Run manifest",
    }
    assert all(len(n) == 1 for n in notes.values())
    figures = {"delta_vs_rms_cosine", "cosine_heatmap", "per_domain", "train_curves"}
    assert {p.stem for p in (tmp_path / "figures").iterdir()} == figures
    assert sum(t == "img" for t, _ in _parse(paths["html"]).tags) == len(figures)
    # the paper comparison is worked out from the combinations themselves
    paper = _md_sections(md)["The paper vs this run"]
    mm = next(r for r in res["combinations"] if r["domains"] == ["math", "medicine"])
    assert f"{mm['delta_pct']:+.2f}" in paper and "-9.10" in paper
    # the manifest shows what the old results record
    assert "`temath`" in _md_sections(md)["Run manifest"]
    # without the logs, the training curves are a note too
    shutil.rmtree(tmp_path / "seed-1")
    assert isinstance(_curves(res, tmp_path)[0], Note)


def test_rms_cosine_is_plotted_even_without_its_statistics():
    res = full_results()
    del res["statistics"]["rms_cosine"]
    blocks = _scatter(res)
    assert [b.name for b in blocks] == [
        "delta_vs_rms_cosine",
        "delta_vs_rms_activation_cosine",
        "delta_vs_max_cross_talk",
    ]
    assert f"Pearson r = {res['correlation']['pearson_r']:.3f}" in blocks[0].caption


def test_bare_results_render_every_section_or_a_note(tmp_path):
    # only what `lorasum report` requires: every other section says why it is empty
    res = old_results()
    for k in ("data", "singles", "merged_training", "base", "wall_seconds", "lorasum_version"):
        res.pop(k)
    for r in res["combinations"]:
        r.pop("per_domain")
        r.pop("ci95")
    paths = write_report(res, tmp_path)
    md = paths["markdown"].read_text()
    assert len(_md_sections(md)) == 17
    assert set(_notes(md)) >= {"Per-domain perplexity", "Data and training", "Training loss"}
    assert {p.stem for p in (tmp_path / "figures").iterdir()} == {
        "delta_vs_rms_cosine",
        "cosine_heatmap",
    }
    _parse(paths["html"])


@pytest.mark.parametrize(
    "split, expected",
    [
        (
            {"train": {"n": 48, "sha256": "aa"}, "test": {"n": 24, "sha256": "bb"}},
            [("48", "aa"), ("24", "bb")],
        ),
        ({"train": 48, "test": 24, "sha256": "bb"}, [("48", ""), ("24", "bb")]),
    ],
)
def test_manifest_reads_both_split_shapes(split, expected):
    assert [_split(split, "train"), _split(split, "test")] == expected


def test_manifest_reads_what_the_study_writes():
    """The manifest's split summary (as the study writes it) shows each split's own hash."""
    fingerprint = {
        "origin": "o",
        "train": {"n": 48, "sha256": "aa"},
        "test": {"n": 24, "sha256": "bb"},
    }
    summary = study_results._split_summary(fingerprint)
    assert [_split(summary, "train"), _split(summary, "test")] == [("48", "aa"), ("24", "bb")]


def test_one_seed_study_has_no_intervals():
    res = full_results()
    res["seeds"] = [1]
    for r in res["combinations"]:
        r["per_seed"] = r["per_seed"][:1]
        r["ci95"] = {k: None for k in r["ci95"]}
    text = " ".join(b.text for b in _headline(res) if isinstance(b, Para))
    assert "One seed: no confidence intervals" in text
    table = next(b for b in _headline(res) if isinstance(b, Table))
    assert not any("[" in c for row in table.rows for c in row)


def test_cli_report_rebuilds_and_explains_bad_input(tmp_path, capsys):
    (tmp_path / "results.json").write_text(json.dumps(old_results()))
    assert main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "report.html" in out and "cosine_vs_delta.png" in out
    assert (tmp_path / "report.html").stat().st_size > 10_000
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", str(empty)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lorasum: error: no results.json") and err.count("\n") == 1
    (empty / "results.json").write_text("{not json")
    assert main(["report", str(empty)]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    (empty / "results.json").write_text(json.dumps({"model": "x"}))
    assert main(["report", str(empty)]) == 2
    assert "not a lorasum study" in capsys.readouterr().err


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed")
def test_report_renders_in_chromium(full_report, tmp_path):
    _, paths = full_report
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            _chromium(),
            "--headless",
            "--disable-gpu",
            "--no-sandbox",
            "--hide-scrollbars",
            f"--screenshot={shot}",
            "--window-size=1200,4000",
            paths["html"].resolve().as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    with Image.open(shot) as im:
        gray = np.asarray(im.convert("L"), dtype=np.float64)
    assert gray.shape == (4000, 1200)
    # not blank: text and figures darken a real share of the page, with many grey levels
    assert (gray < 128).mean() > 0.01
    assert len(np.unique(gray)) > 50
    # laid out down its whole height (the figures loaded and take their room)
    assert (gray[3000:] < 200).mean() > 0.005


def test_decomposition_section_shows_both_factors_and_both_rankings(full_report):
    res, paths = full_report
    text = _md_sections(paths["markdown"].read_text())["What Δ% is made of"]
    for r in res["combinations"]:
        lo, hi = r["ci95"]["delta_vs_singles_pct"]
        assert f"{r['delta_vs_singles_pct']:+.2f} [{lo:+.2f}, {hi:+.2f}]" in text
    header = (
        "| predictor | LOO ρ: Δ% vs merged | LOO ρ: sum vs own adapters "
        "| LOO mean absolute error: sum vs own adapters (points) |"
    )
    assert header in text  # four columns: no "|" inside a cell
    rho = res["prediction_vs_singles"]["rms_cosine"]["spearman_rho"]
    assert (
        f"| `rms_cosine` | {res['prediction']['rms_cosine']['spearman_rho']:.2f} | {rho:.2f} |"
        in text
    )


def test_decomposition_of_older_results_is_a_note():
    res = full_results()
    for r in res["combinations"]:
        for k in ("ppl_singles", "delta_vs_singles_pct", "merged_gain_pct"):
            r.pop(k)
    res.pop("prediction_vs_singles")
    blocks = _decomposition(res)
    assert len(blocks) == 1 and isinstance(blocks[0], Note) and "predate" in blocks[0].text


def test_converged_budget_reports_what_stopped_each_adapter_older_results_too(tmp_path):
    """Each adapter's stop step, kept step and what ended it, and the count of each; a
    results.json from before ``stopped_by`` existed renders from its ``stopped_early``."""
    res = full_results()
    tb = res["training_budget"]
    assert not [b for b in _budget(res) if isinstance(b, Table) and "stopped by" in b.header]
    tb["name"] = "converged"
    units = list(tb["adapters"])
    for i, unit in enumerate(units):  # older records: no stop_step, stopped_by or schedule
        tb["adapters"][unit] = [
            {
                "steps": 10 + s,
                "best_step": 7,
                "epochs": 1.0,
                "real_tokens": 100,
                "stopped_early": (i + s) % 3 == 0,
            }
            for s in range(len(SEEDS))
        ]
    early = sum((i + s) % 3 == 0 for i in range(len(units)) for s in range(len(SEEDS)))
    n = len(units) * len(SEEDS)
    (tmp_path / "results.json").write_text(json.dumps(res))
    md = rebuild_report(tmp_path)["markdown"].read_text()
    section = _md_sections(md)["Training budget"]
    assert (
        f"Of the {n} adapter trainings, {early} were stopped by patience (the validation loss "
        f"stopped improving) and {n - early} by the cap (train.max_epochs)."
    ) in section
    assert ("Most ran to the cap" in section) == (n - early > n / 2)
    table = next(b for b in _budget(res) if isinstance(b, Table) and "stopped by" in b.header)
    assert len(table.rows) == n
    first = units[0]  # i = 0: seed index 0 stopped early, 1 and 2 ran to the cap
    assert table.rows[:3] == [
        [first, str(SEEDS[s]), str(10 + s), "7", by, "linear"]
        for s, by in enumerate(("patience", "cap", "cap"))
    ]
    # newer records say it themselves
    tb["adapters"][first][1].update(stop_step=11, stopped_by="patience", schedule="constant")
    table = next(b for b in _budget(res) if isinstance(b, Table) and "stopped by" in b.header)
    assert table.rows[1] == [first, str(SEEDS[1]), "11", "7", "patience", "constant"]
