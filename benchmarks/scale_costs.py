"""Per-unit costs measured in finished studies, and the projection of a large grid.

    python benchmarks/scale_costs.py runs/budget/epochs runs/budget/steps-bf16 ...   # measured
    python benchmarks/scale_costs.py --project                                       # projection

Measured: per study and unit kind, the units with a recorded time (results.json →
manifest.units: a training's and an evaluation's own seconds, a composition's or calibration's
seconds in the run that made it), their median and total seconds, and for trainings and
evaluations the median tokens/s (real, non-padding tokens: the adapters' `lorasum.json`
metrics, the evaluations' `timing`) and the precision the trainings record. Trainings are split
into single-domain and merged-data adapters (a merged pair has twice the rows).

Projection (`lorasum.study.cost.projection`): 20 domains × max order 2 × 3 seeds on a 7B base
on H100s; the assumptions are printed with the numbers (see docs/SCALE.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import replace
from pathlib import Path

from lorasum.study import cost


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _eval_timings(study: Path) -> dict[tuple, dict]:
    """(seed, unit) → an evaluation's timing (seconds, real_tokens)."""
    out = {}
    for path in [study / "evals" / "base.json", *study.glob("seed-*/evals/*.json")]:
        timing = (_json(path).get("result") or {}).get("timing")
        if timing:
            seed = None if path.parent.parent == study else int(path.parent.parent.name[5:])
            out[(seed, path.stem)] = timing
    return out


def measured(study: Path) -> list[dict]:
    """One row per unit kind (trainings split into single / merged) of a finished study."""
    results = _json(study / "results.json")
    evals = _eval_timings(study)
    rows: dict[str, dict] = {}
    for u in results["manifest"]["units"]:
        kind = u["kind"]
        tps, precision = None, None
        if kind == "train":
            kind = "train (merged)" if u["unit"].startswith("merged-") else "train (single)"
            marker = study / f"seed-{u['seed']}" / "adapters" / u["unit"] / "lorasum.json"
            metrics = _json(marker)["metrics"]
            tps, precision = metrics.get("tokens_per_second"), metrics.get("precision")
        elif kind == "eval" and (u["seed"], u["unit"]) in evals:
            t = evals[(u["seed"], u["unit"])]
            tps = t["real_tokens"] / t["seconds"] if t["seconds"] else None
        row = rows.setdefault(kind, {"kind": kind, "seconds": [], "tps": [], "precision": set()})
        if u["seconds"] is not None:
            row["seconds"].append(u["seconds"])
        if tps is not None:
            row["tps"].append(tps)
        if precision:
            row["precision"].add(precision)
    return [
        {
            "kind": r["kind"],
            "timed": len(r["seconds"]),
            "median_s": _median(r["seconds"]),
            "total_s": sum(r["seconds"]),
            "median_tokens_per_s": _median(r["tps"]),
            "precision": ",".join(sorted(r["precision"])) or "",
        }
        for r in sorted(rows.values(), key=lambda r: r["kind"])
    ]


def _f(x: float | None, fmt: str) -> str:
    return "–" if x is None else format(x, fmt)


def render_measured(study: Path) -> str:
    results = _json(study / "results.json")
    hw = results["manifest"]["hardware"]
    budget = results["config"].get("budget", "epochs")
    head = (
        f"### {study.name} (budget {budget}, {len(results['seeds'])} seed(s), "
        f"wall {results['manifest']['wall_seconds'] / 60:.0f} min, {hw.get('workers')} workers, "
        f"torch {results['manifest']['versions'].get('torch')})\n\n"
        "| unit kind | timed units | median s | total s | median tokens/s | precision |\n"
        "|---|---:|---:|---:|---:|---|"
    )
    lines = [head]
    for r in measured(study):
        lines.append(
            f"| {r['kind']} | {r['timed']} | {_f(r['median_s'], '.2f')} | "
            f"{_f(r['total_s'], '.0f')} | {_f(r['median_tokens_per_s'], '.0f')} | {r['precision']} |"
        )
    return "\n".join(lines)


# The projected grid: the `standard` preset's settings (methods sum + regmean_rescaled, the
# predictors, cross-domain evaluations, 1 epoch, batch 8) at 20 domains, max order 2, 3 seeds,
# with the paper's data sizes: 10,000 training and 1,000 test rows per domain (its domains
# hold ~7k–30k rows), ≤ 128 tokens per row (its max length; the bound is used as the mean).
PROJECTED = cost.Grid(
    domains=20,
    max_order=2,
    seeds=3,
    methods=("regmean_rescaled",),
    cross_domain=True,
    paper_variants=True,
    predictors=True,
    train_rows=10_000,
    test_rows=1_000,
    batch_size=8,
)
TOKENS_PER_ROW = 128


ONE_PASS = 32 * 2**30  # gradient sums of every adapted module of a 7B model (14.4 GB fp32)


def _projection_table(p8: dict) -> list[str]:
    lines = [
        "| unit kind | units | tokens | GPU-hours | longest unit (h) |",
        "|---|---:|---:|---:|---:|",
    ]
    for kind, n in p8["units"].items():
        lines.append(
            f"| {kind} | {n} | {_f(p8['tokens'].get(kind), '.3g')} | "
            f"{p8['gpu_hours'][kind]:.1f} | {p8['longest_unit_hours'][kind]:.3f} |"
        )
    total = sum(p8["units"].values())
    return [*lines, f"| **all** | {total} | | **{p8['gpu_hours_total']:.0f}** | |"]


def render_projection(grid: cost.Grid = PROJECTED, tokens_per_row: float = TOKENS_PER_ROW) -> str:
    hw = cost.Hardware()
    lines = [
        f"grid: N={grid.domains} domains, max order {grid.max_order}, S={grid.seeds} seeds, "
        f"methods sum+{'+'.join(grid.methods)}, predictors={grid.predictors}, "
        f"cross_domain={grid.cross_domain}; {grid.train_rows} train / {grid.test_rows} test rows "
        f"per domain, {tokens_per_row} tokens per row, {grid.epochs:g} epoch(s)",
        f"hardware: {hw.name}, dense {hw.peak_bf16 / 1e12:.0f} TFLOP/s BF16, "
        f"{hw.peak_fp32 / 1e12:.0f} FP32, {hw.peak_fp64 / 1e12:.0f} FP64 Tensor Core; "
        f"MFU {hw.mfu:.0%}; compositions and predictors units 10 s each",
    ]
    lora, full = cost.Model(), cost.Model(train_flops=6.0)
    variants = [
        ("training 4P; gradients as the study runs them (256 MiB groups, one unit per domain)",
         grid, lora, cost.DEFAULT_MAX_BYTES),
        ("training 6P; the same", grid, full, cost.DEFAULT_MAX_BYTES),
        ("training 4P; gradients in one pass (32 GiB groups; not built), one unit per domain",
         grid, lora, ONE_PASS),
        ("training 6P; the same", grid, full, ONE_PASS),
        ("training 4P; predictors off (regmean_rescaled still calibrates)",
         replace(grid, predictors=False), lora, ONE_PASS),
        ("training 6P; the same", replace(grid, predictors=False), full, ONE_PASS),
    ]  # fmt: skip
    summary = [
        "| reading | GPU-hours | wall on 8 GPUs (h) | wall on 64 GPUs (h) |",
        "|---|---:|---:|---:|",
    ]
    for i, (label, g, model, max_bytes) in enumerate(variants):
        p8, p64 = (
            cost.projection(g, tokens_per_row, n, model, hw, gradient_max_bytes=max_bytes)
            for n in (8, 64)
        )
        if i == 0:
            lines += [f"\n{model.name} (P = {model.params:.2g}), {label}:", *_projection_table(p8)]
        summary.append(
            f"| {label} | {p8['gpu_hours_total']:.0f} | {p8['wall_hours']:.1f} | "
            f"{p64['wall_hours']:.1f} |"
        )
    return "\n".join([*lines, "", *summary])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("studies", nargs="*", type=Path, help="finished study directories")
    parser.add_argument("--project", action="store_true", help="print the 20×2×3 7B projection")
    args = parser.parse_args()
    for study in args.studies:
        print(render_measured(study) + "\n")
    if args.project:
        print(render_projection())


if __name__ == "__main__":
    main()
