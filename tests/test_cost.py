"""The closed-form cost model (`lorasum.study.cost`) against the plans `plan_study` makes."""

from __future__ import annotations

import math
from collections import Counter

import pytest
from conftest import make_qa, write_jsonl

from lorasum.study import cost
from lorasum.study.plan import plan_study
from lorasum.study.reproduce import reproduce, resolve
from lorasum.study.tasks import (
    CalibrateTask,
    DataPredictorsTask,
    DomainGradientsTask,
    FitTask,
    TrainTask,
)

# (domains, settings): tiny studies of 3 and 4 domains, orders 1…3 (max_order 2 … all), 1–2
# seeds, with and without calibrating methods, cross-domain, variants, predictors, budgets
CASES = [
    (3, {}),
    (3, {"max_order": 2, "seeds": [1, 2], "methods": "sum,regmean_rescaled,tsv",
         "predictors": True, "cross_domain": False}),
    (3, {"budget": "steps", "methods": "sum,ties"}),
    (3, {"max_order": 2, "paper_variants": False, "predictors": True, "methods": "sum"}),
    (4, {"max_order": 3, "methods": "sum,calibrated,regmean", "budget": "steps"}),
    (4, {"max_order": 2, "seeds": [1, 2], "budget": "steps", "methods": "tsv",
         "cross_domain": False}),
    (4, {"max_order": 3, "snapshots": "0.5,1,2", "methods": "sum,tsv,regmean",
         "predictors": True}),
    (4, {"seeds": [3, 4], "methods": "calibrated,orthogonal_projection", "paper_variants": False}),
    (3, {"methods": "sum,calibrated,learned", "snapshots": "0.5,1"}),
]  # fmt: skip


@pytest.fixture(scope="module")
def four_domains(qa_files, tmp_path_factory) -> dict[str, str]:
    extra = write_jsonl(tmp_path_factory.mktemp("qa4") / "travel.jsonl", make_qa("travel", 60, 7))
    return {**{n: str(p) for n, p in qa_files.items()}, "travel": str(extra)}


def _settings(model, domains: dict[str, str], n: int, settings: dict) -> dict:
    doms = [f"{k}={v}" for k, v in list(domains.items())[:n]]
    return {"model": str(model), "domains": doms, "precision": "fp32", **settings}


def _grid(lay, settings: dict) -> cost.Grid:
    """The Grid of a resolved study, read off its layout (rows from its data splits)."""
    train = {len(s.splits["train"]) for s in lay.sources.values()}
    test = {len(s.splits["test"]) for s in lay.sources.values()}
    assert len(train) == len(test) == 1  # the model assumes equal rows per domain
    snaps = lay.snapshot_epochs
    return cost.Grid(
        domains=len(lay.names),
        max_order=settings.get("max_order"),
        seeds=len(lay.seeds),
        methods=tuple(lay.methods),
        cross_domain=lay.cross_domain,
        paper_variants=settings.get("paper_variants", True),
        predictors=lay.predictors,
        budget=lay.budget,
        snapshots=len(snaps),
        train_rows=train.pop(),
        test_rows=test.pop(),
        batch_size=lay.base_cfg.batch_size,
        epochs=lay.base_cfg.epochs,
    )


@pytest.mark.parametrize(("n", "settings"), CASES)
def test_unit_counts_equal_the_plan(tiny_llama, four_domains, tmp_path, n, settings):
    kw = _settings(tiny_llama, four_domains, n, settings)
    planned = reproduce(tmp_path / "s", preset="tiny", progress=False, plan_only=True, **kw)
    by_kind = Counter(unit_id.split("/")[0] for unit_id in planned["units"])
    lay = resolve(tmp_path / "s", "tiny", None, kw, False).layout
    assert cost.unit_counts(_grid(lay, settings)) == dict(by_kind)


def _oracle_rows(rows: int, batch: int, steps: int) -> int:
    """Rows a run of ``steps`` steps processes: every epoch the full batches, then the rest."""
    sizes = [batch] * (rows // batch) + ([rows % batch] if rows % batch else [])
    return sum(sizes[i % len(sizes)] for i in range(steps))


@pytest.mark.parametrize(("n", "settings"), CASES)
def test_tokens_equal_the_plans_rows_at_max_length(tiny_llama, four_domains, tmp_path, n, settings):
    """At ℓ = max_length the model's tokens are the rows of the plan's units × max_length:
    the units' own cost fields (rows × max_length, ×3 for a training), and a training's rows
    from its step count."""
    kw = _settings(tiny_llama, four_domains, n, settings)
    lay = resolve(tmp_path / "s", "tiny", None, kw, False).layout
    tasks = plan_study(lay).tasks
    grid, ml = _grid(lay, settings), lay.base_cfg.max_length
    tokens = cost.token_counts(grid, ml)

    evals = [t.cost() * 1000 for t in tasks if t.kind == "eval"]
    assert tokens["eval"] == pytest.approx({"total": sum(evals), "largest": max(evals)})

    trains = {}
    for t in tasks:
        if isinstance(t, TrainTask):
            cfg, rows = t.cfg, sum(len(s.splits["train"]) for s in t.sources)
            steps = cfg.max_steps or math.ceil(cfg.epochs * math.ceil(rows / cfg.batch_size))
            trains[t] = _oracle_rows(rows, cfg.batch_size, steps) * ml
            if lay.budget == "epochs":  # the cost counts one pass over the rows
                assert trains[t] == pytest.approx(t.cost() * 1000 / 3 * cfg.epochs)
    totals = list(trains.values())
    assert tokens["train"] == pytest.approx({"total": sum(totals), "largest": max(totals)})

    calib = {t.single.domains[0]: t.cost() * 1000 for t in tasks if isinstance(t, CalibrateTask)}
    if calib:  # computed once per domain, whatever the seeds and step counts
        assert tokens["calibrate"]["total"] == pytest.approx(sum(calib.values()))
    else:
        assert "calibrate" not in tokens
    val = {len(s.splits["val"]) for s in lay.sources.values()}
    assert val == {grid.test_rows}  # the model reads the val split's size off the test split's
    fits = []
    for t in tasks:
        if isinstance(t, FitTask) and t.method == "calibrated":
            fits.append(grid.calibrated_fraction * trains[t.merged])
        elif isinstance(t, FitTask):  # learned: K val rows of each of its domains, every epoch
            opts = t.options
            rows = sum(min(opts["rows"], len(s.splits["val"])) for s in t.val_sources)
            fits.append(rows * opts["epochs"] * ml)
    assert tokens.get("fit", {}).get("total", 0) == pytest.approx(sum(fits))
    data = [t.cost() * 1000 / 3 for t in tasks if isinstance(t, DomainGradientsTask)]
    assert tokens.get("gradients", {}).get("total", 0) == pytest.approx(sum(data))
    if data:  # one unit per domain: the longest is one domain's rows
        assert tokens["gradients"]["largest"] == pytest.approx(max(data))
        (combine,) = [t for t in tasks if isinstance(t, DataPredictorsTask)]
        assert set(combine.dependencies()) == {
            t for t in tasks if isinstance(t, DomainGradientsTask)
        }
    assert "predictors" not in tokens  # they compare saved statistics


@pytest.mark.parametrize("rows", [8, 9, 13, 16])
@pytest.mark.parametrize("steps", [1, 2, 3, 5, 7])
def test_rows_seen_cycles_through_the_rows(rows, steps):
    assert cost.rows_seen(rows, 4, steps) == _oracle_rows(rows, 4, steps)


def test_projection_adds_phases_and_scales_with_gpus():
    grid = cost.Grid(
        domains=20,
        max_order=2,
        seeds=3,
        methods=("regmean_rescaled",),
        train_rows=1000,
        test_rows=100,
    )
    model = cost.Model(params=1e9)
    hw = cost.Hardware(peak_bf16=1e15, peak_fp32=2e14, peak_fp64=1e14, mfu=0.5)
    one, many = (cost.projection(grid, 100, g, model, hw, compose_seconds=2.0) for g in (1, 10**6))
    train_tokens = cost.token_counts(grid, 100)["train"]["total"]
    # trainings: 4 FLOP per parameter and token at half of 1e15 FLOP/s
    assert one["gpu_hours"]["train"] == pytest.approx(train_tokens * 4e9 / 5e14 / 3600)
    gram = model.gram_flops()
    calib = 20 * 1000 * 100 * (2e9 / 1e14 + gram / 5e13) / 3600  # fp32 forward, fp64 Grams
    # data predictors: ⌈4 B × adapted weights / max_bytes⌉ forward+backward passes (4 FLOP per
    # parameter), plus δᵀx once per adapted weight, in fp32
    adapted = 32 * (4 * 4096**2 + 4096 * 11008)
    for max_bytes, passes in ((2**40, 1), (2**30, math.ceil(4 * adapted / 2**30))):
        p = cost.projection(grid, 100, 1, model, hw, gradient_max_bytes=max_bytes)
        per_token = passes * 4e9 + 2 * adapted
        assert p["gpu_hours"]["gradients"] == pytest.approx(
            20 * 1000 * 100 * per_token / 1e14 / 3600
        )
        # one unit per domain: the longest is a twentieth of the work
        assert p["longest_unit_hours"]["gradients"] == pytest.approx(
            p["gpu_hours"]["gradients"] / 20
        )
    assert one["gpu_hours"]["calibrate"] == pytest.approx(calib)
    for kind in ("compose", "predictors"):  # no tokens: 2 s each
        assert one["gpu_hours"][kind] == pytest.approx(one["units"][kind] * 2 / 3600)
    # on one GPU the wall time is the work; with unbounded GPUs, the longest unit per phase
    assert one["wall_hours"] == pytest.approx(one["gpu_hours_total"])
    longest = many["longest_unit_hours"]
    phases = [max(longest[k] for k in p if k in longest) for p in cost.PHASES]
    assert many["wall_hours"] == pytest.approx(sum(phases))


@pytest.mark.parametrize("domains", [2, 5, 20, 40])
def test_gradients_units_scale_with_the_domains_not_the_pairs(domains):
    """N gradients units and N domains' rows of tokens, whatever the order and seeds; one unit
    of the data's predictors and one per seed; none without the predictors."""
    for order, seeds in ((2, 1), (3, 3), (None, 2)):
        if order is None and domains > 5:
            continue  # every order of 20 domains: 10⁶ combinations, the counts alone
        grid = cost.Grid(domains=domains, max_order=order, seeds=seeds, train_rows=50)
        units, tokens = cost.unit_counts(grid), cost.token_counts(grid, 10)
        assert units["gradients"] == domains
        assert units["predictors"] == seeds + 1
        assert tokens["gradients"] == {"total": domains * 50 * 10, "largest": 50 * 10}
        off = cost.Grid(domains=domains, max_order=order, seeds=seeds, predictors=False)
        assert "gradients" not in cost.unit_counts(off)
        assert "gradients" not in cost.token_counts(off, 10)
