"""Benchmark: `soft_projection` and `orthogonal_projection` compose time on the default model's
shapes, and their outputs compared with a saved earlier run (the "equal to 1e-5" check).

    .venv/bin/python benchmarks/projection_bench.py [--adapters 2] [--save F] [--compare F]

Inputs are synthetic, made the same way on every run: SmolLM2-135M's shapes (30 layers; q, k,
v, o 576 wide inputs, down_proj 1536), r = 8 adapters, and per domain Gram matrices of 4,096
token activations with a power-law spectrum in a partly shared random basis (the domains'
inputs overlap, as real ones do; q/k/v share one matrix object as `Calibration.normalised`
gives them). Each method is timed as `merge_adapters` over every module (the basis of the
projection included, nothing cached between repeats: the eigenpair cache is emptied before
each), then once more with the eigenpairs its last repeat cached (what another seed's adapters
or the other projection method of a pair pay: `projection.cached_spectrum`). ``--save`` writes the merged factors;
``--compare`` reports the largest relative Frobenius difference of ΔW per module against them
(run ``--save`` with the old code, ``--compare`` with the new). Prints a table and writes JSON
(default: benchmarks/results/projection.json). Not a test: times depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lorasum.factors import LoraFactors
from lorasum.methods import MergeConfig, merge_adapters, projection
from lorasum.methods.regmean import _FACTORED

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {  # module -> (d_out, d_in), SmolLM2-135M; inputs: attn (q/k/v), o, down
    "self_attn.q_proj": (576, 576, "attn"),
    "self_attn.k_proj": (192, 576, "attn"),
    "self_attn.v_proj": (192, 576, "attn"),
    "self_attn.o_proj": (576, 576, "o"),
    "mlp.down_proj": (576, 1536, "down"),
}
LAYERS, RANK, TOKENS = 30, 8, 4096
METHODS = ("soft_projection", "orthogonal_projection")


def domain_gram(d: int, shared: torch.Tensor, seed: int) -> torch.Tensor:
    """Ĝ of TOKENS activations: power-law scales in a basis near a shared one (float64)."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(shared + 0.5 * torch.randn(d, d, generator=g, dtype=torch.float64))
    scales = torch.arange(1, d + 1, dtype=torch.float64) ** -1.0
    X = torch.randn(TOKENS, d, generator=g, dtype=torch.float64) * scales @ basis.T
    return X.T @ X / TOKENS


def inputs(n: int) -> tuple[list[dict[str, LoraFactors]], list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    adapters: list[dict[str, LoraFactors]] = [{} for _ in range(n)]
    grams: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    for layer in range(LAYERS):
        dims = {"attn": 576, "o": 576, "down": 1536}
        shared = {k: torch.randn(d, d, generator=g, dtype=torch.float64) for k, d in dims.items()}
        per = [
            {
                k: domain_gram(d, shared[k], seed=1000 * layer + 10 * j + i)
                for i, (k, d) in enumerate(dims.items())
            }
            for j in range(n)
        ]
        for name, (d_out, d_in, src) in SHAPES.items():
            key = f"model.layers.{layer}.{name}"
            for j in range(n):
                A = torch.randn(RANK, d_in, generator=g) / d_in**0.5
                B = torch.randn(d_out, RANK, generator=g) * 0.01
                adapters[j][key] = LoraFactors(A=A, B=B, scale=2.0)
                grams[j][key] = per[j][src]
    return adapters, grams


def dense(f: LoraFactors) -> torch.Tensor:
    return f.scale * (f.B.double() @ f.A.double())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--adapters", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--save", type=Path, help="write the merged factors here (safetensors)")
    ap.add_argument("--compare", type=Path, help="compare with factors saved by --save")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks/results/projection.json")
    a = ap.parse_args()
    adapters, grams = inputs(a.adapters)
    weights = [1.0] * a.adapters
    saved = load_file(str(a.compare)) if a.compare else None
    out, rows = {}, []
    cache = Path(tempfile.mkdtemp(prefix="lorasum-spectra-"))
    projection.spectra_dir = lambda: cache  # this run's own eigenpair cache, emptied per cold run

    def compose(method: str, cold: bool) -> tuple[float, object]:
        _FACTORED.clear()
        if cold:
            for f in cache.iterdir():
                f.unlink()
        t = time.perf_counter()
        result = merge_adapters(adapters, weights, MergeConfig(method=method), grams)
        return time.perf_counter() - t, result

    for method in a.methods.split(","):
        times = []
        for _ in range(a.repeats):
            seconds, result = compose(method, cold=True)
            times.append(seconds)
        warm, _ = compose(method, cold=False)  # another composition over the same statistics
        row = {"method": method, "seconds": statistics.median(times), "all": times}
        row["warm_seconds"] = warm
        worst = 0.0
        for name, f in result.modules.items():
            out[f"{method}/{name}/A"], out[f"{method}/{name}/B"] = f.A.contiguous(), f.B
            out[f"{method}/{name}/scale"] = torch.tensor(f.scale)
            if saved is not None:
                old = LoraFactors(
                    A=saved[f"{method}/{name}/A"],
                    B=saved[f"{method}/{name}/B"],
                    scale=float(saved[f"{method}/{name}/scale"]),
                )
                ref = dense(old)
                worst = max(worst, float((dense(f) - ref).norm() / ref.norm()))
        if saved is not None:
            row["max_rel_diff"] = worst
        rows.append(row)
        diff = f"   max rel. diff of ΔW vs saved {worst:.1e}" if saved is not None else ""
        print(
            f"{method:24s} {row['seconds']:7.2f} s per composition, {warm:6.2f} s with its "
            f"eigenpairs cached{diff}",
            flush=True,
        )
    if a.save:
        save_file(out, str(a.save))
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(
        json.dumps(
            {
                "rows": rows,
                "adapters": a.adapters,
                "cpu": platform.processor(),
                "threads": torch.get_num_threads(),
                "load": os.getloadavg()[0],
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
