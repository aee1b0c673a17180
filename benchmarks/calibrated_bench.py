"""Benchmark: calibration-based merges and predictors at the default model's shapes.

Prints a table and writes JSON (default: benchmarks/results/calibrated.json). Not a test: the
numbers depend on the machine and what else runs on it (recorded: CPU, threads, load).

    PYTHONPATH=src .venv/bin/python benchmarks/calibrated_bench.py [--layers 30] [--threads 1]

SmolLM2-135M's shapes, without loading it: 30 layers, q/o 576×576, k/v 192×576 (q/k/v read one
input, so their adapters' statistics are one matrix), down 576×1536; three random r = 4
adapters; per adapter a random input Gram sum per distinct input (576², 576², 1536²), wrapped
in `lorasum.analysis.calibration.Calibration` as compose gets them from the cache, normalised as
compose does. Times: `Calibration.normalised` (3 adapters), every calibration method's
`merge_adapters`, `interference_predictors`, and the cache file's size and write/read time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from lorasum.analysis.calibration import Calibration
from lorasum.analysis.predictors.activation import interference_predictors
from lorasum.factors import LoraFactors
from lorasum.methods import MergeConfig, get_method, merge_adapters, method_names

D, D_KV, D_FF, R, TOKENS = 576, 192, 1536, 4, 3000


def _gram_sum(d: int, seed: int, tokens: int = TOKENS) -> torch.Tensor:
    """Σ x xᵀ of anisotropic random inputs (a few large directions, as real activations)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(d, tokens, generator=g)  # (d, n) fp32
    X *= torch.logspace(1.0, -1.0, d)[:, None]
    X[: d // 8] += 0.5 * torch.randn(1, tokens, generator=g)  # a direction every token shares
    return (X @ X.T).double()


def build(layers: int, n_adapters: int = 3):
    adapters, calibrations = [], []
    for a in range(n_adapters):
        g = torch.Generator().manual_seed(a)
        modules, grams, tokens = {}, {}, {}
        # one draw per adapter and input size, cloned per layer: distinct tensors as on disk
        pool = {d: _gram_sum(d, 10 * a + i) for i, d in enumerate((D, D_FF))}
        for layer in range(layers):
            p = f"model.layers.{layer}."
            shapes = {
                "self_attn.q_proj": (D, D),
                "self_attn.k_proj": (D_KV, D),
                "self_attn.v_proj": (D_KV, D),
                "self_attn.o_proj": (D, D),
                "mlp.down_proj": (D, D_FF),
            }
            for name, (d_out, d_in) in shapes.items():
                modules[p + name] = LoraFactors(
                    A=torch.randn(R, d_in, generator=g) / d_in**0.5,
                    B=torch.randn(d_out, R, generator=g) / R,
                    scale=16.0,
                )
            qkv = pool[D].clone()
            for name in ("q_proj", "k_proj", "v_proj"):
                grams[p + "self_attn." + name] = qkv  # one input, one matrix (as the cache)
            grams[p + "self_attn.o_proj"] = pool[D].clone() * 0.5
            grams[p + "mlp.down_proj"] = pool[D_FF].clone()
            tokens.update(dict.fromkeys([m for m in grams if m.startswith(p)], TOKENS))
        adapters.append(modules)
        calibrations.append(Calibration(grams=grams, tokens=tokens, key=f"bench{a}"))
    return adapters, calibrations


def timed(fn, repeat: int = 1):
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def cache_io(calibration: Calibration) -> dict:
    """Write and read one adapter's statistics with the calibration module's own functions."""
    from lorasum.analysis import calibration as cal

    aliases = {}
    seen: dict[int, str] = {}
    for m, g in calibration.grams.items():
        if id(g) in seen:
            aliases[m] = seen[id(g)]
        else:
            seen[id(g)] = m
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"{cal.FILE_PREFIX}{calibration.key}.safetensors"
        calibration.info = {}
        t_write, _ = timed(lambda: cal._write_cache(path, calibration, aliases, "sha"))
        size = path.stat().st_size
        t_read, back = timed(lambda: cal._read_cache(path, calibration.key))
        worst = max(
            float((back.grams[m] - calibration.grams[m].float().double()).abs().max())
            / float(calibration.grams[m].abs().max())
            for m in calibration.grams
        )
    return {"bytes": size, "write_s": t_write, "read_s": t_read, "max_rel_err": worst}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument("--methods", default=None, help="comma list (default: every calibrated)")
    parser.add_argument("--out", default="benchmarks/results/calibrated.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = (
        args.methods.split(",")
        if args.methods
        else [m for m in method_names() if get_method(m).calibration]
    )
    adapters, calibrations = build(args.layers)
    rows = {}
    t, grams = timed(lambda: [c.normalised() for c in calibrations])
    rows["normalise (3 adapters)"] = t
    for name in methods:
        config = MergeConfig(method=name)
        t, _ = timed(lambda c=config: merge_adapters(adapters, [1.0] * 3, c, grams))
        rows[f"merge {name}"] = t
    named = {f"a{i}": a for i, a in enumerate(adapters)}
    t, _ = timed(
        lambda: interference_predictors(named, dict(zip(named, calibrations, strict=True)))
    )
    rows["interference_predictors (3 pairs)"] = t
    io = cache_io(calibrations[0])
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    cpu = next(
        (line.split(":", 1)[1].strip() for line in info.splitlines() if "model name" in line),
        platform.processor(),
    )
    result = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load": os.getloadavg(),
        "layers": args.layers,
        "seconds": rows,
        "cache": io,
    }
    for k, v in rows.items():
        print(f"{k:<40} {v:8.2f} s")
    print(
        f"{'cache file (1 adapter)':<40} {io['bytes'] / 1e6:8.1f} MB  write {io['write_s']:.2f} s  "
        f"read {io['read_s']:.2f} s  max rel err {io['max_rel_err']:.1e}"
    )
    print(f"cpu {cpu}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
