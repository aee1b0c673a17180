"""Benchmark: merging and comparing LoRA adapters in factored form vs densely (and vs PEFT).

Prints a table and writes JSON (default: benchmarks/results/compose.json). Not a test: the
numbers depend on the machine and on what else runs on it (recorded: CPU, threads, load).

    .venv/bin/python benchmarks/compose_bench.py [--quick] [--out benchmarks/results/compose.json]

1. Synthetic modules 4096×4096 and 11008×4096, three adapters of r = 16 (Σr = 48):
   cosine of two ΔW, factored vs dense; the weighted sum compressed to rank K, factored `svd`
   vs `torch.linalg.svd` of the dense summed ΔW. Each measurement runs in a fresh process, so
   its peak memory is its own (extra peak RSS over the inputs).
2. The default model's shapes (SmolLM2-135M: 30 layers; q, o 576×576; k, v 192×576; down
   576×1536), three r = 4 adapters: `sum` and `svd` in memory and as a full `compose` to disk,
   vs dense SVD per module and PEFT's `add_weighted_adapter(combination_type="svd")`.

``--quick`` skips the dense SVD of 11008×4096 (minutes on a small CPU). ``--threads N`` sets
torch's threads for every measurement, dense and factored alike (lorasum itself runs its
factored algebra on one thread; see `lorasum.factors.single_threaded`). On a machine where
another process holds a core, threaded MKL calls stall (a dense 576×1536 SVD measured 2.0 s on
2 threads vs 0.17 s on 1), so ``--threads 1`` is the fair setting there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from lorasum.factors import LoraFactors, cosine, delta, single_threaded
from lorasum.methods import MergeConfig, merge_adapters

RANK = 16
N_ADAPTERS = 3
SYNTHETIC = [(4096, 4096), (11008, 4096)]
SMOL_LAYERS = 30
SMOL_SHAPES = {  # module -> (d_out, d_in), SmolLM2-135M
    "self_attn.q_proj": (576, 576),
    "self_attn.k_proj": (192, 576),
    "self_attn.v_proj": (192, 576),
    "self_attn.o_proj": (576, 576),
    "mlp.down_proj": (576, 1536),
}
SMOL_RANK = 4


def random_factors(d_out: int, d_in: int, r: int, seed: int) -> LoraFactors:
    g = torch.Generator().manual_seed(seed)
    # trained-LoRA-like magnitudes: A ~ kaiming-ish, B small
    A = torch.randn(r, d_in, generator=g) / d_in**0.5
    B = torch.randn(d_out, r, generator=g) * 0.01
    return LoraFactors(A=A, B=B, scale=2.0)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def median_time(fn, repeat: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


# --- one measurement per process ---------------------------------------------------------------


def run_phase(phase: str, d_out: int, d_in: int) -> dict:
    """Measure one phase on fresh inputs; peak memory = peak RSS after minus before the phase."""
    terms = [random_factors(d_out, d_in, RANK, seed) for seed in range(N_ADAPTERS)]
    weights = [1.0, 0.5, -0.7]
    # warm up the libraries on a tiny problem (their buffers are not part of the phase)
    tiny = [random_factors(32, 24, 2, s) for s in range(N_ADAPTERS)]
    cosine(tiny[0], tiny[1])
    merge_adapters([{"m": t} for t in tiny], weights, MergeConfig(method="svd", rank=3))
    torch.linalg.svd(torch.randn(32, 24), full_matrices=False)
    before = peak_rss_mb()
    out: dict = {"phase": phase, "shape": f"{d_out}x{d_in}"}
    if phase == "cosine_factored":

        def factored_cosine():
            with single_threaded():  # as lorasum.analysis.similarity runs it
                return cosine(terms[0], terms[1])

        out["seconds"], value = median_time(factored_cosine, 20)
    elif phase == "cosine_dense":

        def dense_cosine():
            a = delta(terms[0].A, terms[0].B, terms[0].scale).flatten()  # (d_out·d_in,)
            b = delta(terms[1].A, terms[1].B, terms[1].scale).flatten()
            return float(a @ b / (a.norm() * b.norm()))

        out["seconds"], value = median_time(dense_cosine, 3)
    elif phase.startswith("svd_factored"):
        k = int(phase.rsplit("_", 1)[1])
        cfg = MergeConfig(method="svd", rank=k)
        adapters = [{"m": t} for t in terms]  # one module, through the engine compose uses
        out["seconds"], merged = median_time(lambda: merge_adapters(adapters, weights, cfg), 5)
        value = (merged.modules["m"], merged.report["m"]["kept_energy"])
    elif phase == "svd_dense":

        def dense_svd():
            total = sum(w * delta(t.A, t.B, t.scale) for t, w in zip(terms, weights, strict=True))
            U, S, Vh = torch.linalg.svd(total, full_matrices=False)
            k = N_ADAPTERS * RANK
            return (U[:, :k] * S[:k]) @ Vh[:k]  # (d_out, d_in) rank-Σr reconstruction

        out["seconds"], value = median_time(dense_svd, 1)
    else:
        raise ValueError(phase)
    out["peak_extra_mb"] = max(0.0, peak_rss_mb() - before)
    # accuracy, outside the measured time and memory
    dense_sum = sum(
        w * delta(t.A, t.B, t.scale).double() for t, w in zip(terms, weights, strict=True)
    )
    if phase.startswith("cosine"):
        d0, d1 = (delta(t.A, t.B, t.scale).double().flatten() for t in terms[:2])
        out["value"] = value
        out["abs_error"] = abs(value - float(d0 @ d1 / (d0.norm() * d1.norm())))
    elif phase.startswith("svd_factored"):
        f, out["kept_energy"] = value
        got = delta(f.A, f.B, f.scale).double()
        out["relative_error"] = float((got - dense_sum).norm() / dense_sum.norm())
    else:
        out["relative_error"] = float((value.double() - dense_sum).norm() / dense_sum.norm())
    return out


def phase_in_subprocess(phase: str, d_out: int, d_in: int) -> dict:
    cmd = [sys.executable, __file__, "--phase", phase, "--shape", f"{d_out}x{d_in}"]
    cmd += ["--threads", str(torch.get_num_threads())]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- the default model's shapes ----------------------------------------------------------------


def smol_adapters() -> list[dict[str, LoraFactors]]:
    adapters = []
    for seed in range(N_ADAPTERS):
        modules = {}
        for layer in range(SMOL_LAYERS):
            for j, (name, (d_out, d_in)) in enumerate(SMOL_SHAPES.items()):
                full = f"model.layers.{layer}.{name}"
                modules[full] = random_factors(d_out, d_in, SMOL_RANK, 1000 * seed + 10 * layer + j)
        adapters.append(modules)
    return adapters


def bench_default_model() -> list[dict]:
    from lorasum.adapters import write_adapter
    from lorasum.compose import compose

    adapters = smol_adapters()
    weights = [1.0, 1.0, 1.0]
    total_rank = N_ADAPTERS * SMOL_RANK
    rows = []
    for label, cfg in [
        ("sum (exact, r=12)", MergeConfig(method="sum")),
        ("svd K=12 (= Σr, exact)", MergeConfig(method="svd", rank=total_rank)),
        ("svd K=4", MergeConfig(method="svd", rank=4)),
        ("svd K=auto keep=0.99", MergeConfig(method="svd", rank="auto", keep=0.99)),
    ]:
        merge_adapters(adapters, weights, cfg)  # warm-up
        seconds, result = median_time(lambda cfg=cfg: merge_adapters(adapters, weights, cfg), 3)
        kept = min(m["kept_energy"] for m in result.report.values())
        rows.append({"what": f"merge in memory: {label}", "seconds": seconds, "min_kept": kept})
        print(f"  {rows[-1]['what']}: {seconds * 1e3:.0f} ms", flush=True)

    def dense_all():
        for name in adapters[0]:
            total = sum(delta(a[name].A, a[name].B, a[name].scale) for a in adapters)
            U, S, Vh = torch.linalg.svd(total, full_matrices=False)
            _ = (U[:, :total_rank] * S[:total_rank], Vh[:total_rank])

    seconds, _ = median_time(dense_all, 1)
    rows.append({"what": "dense: Σ ΔW + torch.linalg.svd, 150 modules", "seconds": seconds})
    print(f"  {rows[-1]['what']}: {seconds:.1f} s", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, modules in enumerate(adapters):
            path = Path(tmp) / f"a{i}"
            path.mkdir()
            write_adapter(path, modules, "default")
            paths.append(path)
        for method, options in [("sum", {}), ("svd", {"rank": total_rank})]:
            compose(paths, Path(tmp) / "warm", method=method, overwrite=True, **options)
            seconds, _ = median_time(
                lambda m=method, o=options: compose(
                    paths, Path(tmp) / f"out-{m}", method=m, overwrite=True, **o
                ),
                3,
            )
            rows.append(
                {
                    "what": f"compose to disk (read, hash, merge, write): {method}",
                    "seconds": seconds,
                }
            )
            print(f"  {rows[-1]['what']}: {seconds * 1e3:.0f} ms", flush=True)
    rows.append(bench_peft_svd(adapters, total_rank))
    print(f"  {rows[-1]['what']}: {rows[-1]['seconds']:.1f} s", flush=True)
    return rows


def bench_peft_svd(adapters: list[dict[str, LoraFactors]], svd_rank: int) -> dict:
    """PEFT's add_weighted_adapter(svd) on a synthetic model with the default model's shapes."""
    from peft import LoraConfig, get_peft_model
    from torch import nn

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn = nn.Module()
            self.mlp = nn.Module()
            for name, (d_out, d_in) in SMOL_SHAPES.items():
                parent, leaf = name.split(".")
                setattr(getattr(self, parent), leaf, nn.Linear(d_in, d_out, bias=False))

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = nn.Module()
            self.model.layers = nn.ModuleList(Layer() for _ in range(SMOL_LAYERS))

    targets = sorted({n.rsplit(".", 1)[1] for n in SMOL_SHAPES})
    peft_model = None
    for i, modules in enumerate(adapters):
        cfg = LoraConfig(r=SMOL_RANK, lora_alpha=2 * SMOL_RANK, target_modules=targets)
        if peft_model is None:
            peft_model = get_peft_model(Model(), cfg, adapter_name=f"a{i}")
        else:
            peft_model.add_adapter(f"a{i}", cfg)
        with torch.no_grad():
            for name, f in modules.items():
                layer = peft_model.base_model.model.get_submodule(name)
                layer.lora_A[f"a{i}"].weight.copy_(f.A)
                layer.lora_B[f"a{i}"].weight.copy_(f.B)
    names = [f"a{i}" for i in range(len(adapters))]
    t = time.perf_counter()
    peft_model.add_weighted_adapter(
        names, [1.0] * len(names), "merged", combination_type="svd", svd_rank=svd_rank
    )
    seconds = time.perf_counter() - t
    return {
        "what": f"PEFT add_weighted_adapter(svd, rank {svd_rank}), 150 modules",
        "seconds": seconds,
    }


# --- report ------------------------------------------------------------------------------------


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/compose.json")
    p.add_argument("--quick", action="store_true", help="skip the dense SVD of 11008×4096")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--phase", help=argparse.SUPPRESS)
    p.add_argument("--shape", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.phase:  # child process: one measurement, JSON on stdout
        d_out, d_in = (int(x) for x in args.shape.split("x"))
        print(json.dumps(run_phase(args.phase, d_out, d_in)))
        return

    env = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": os.getloadavg(),
    }
    print(
        f"CPU: {env['cpu']} ({env['cores']} cores, torch {env['torch']}, "
        f"{env['torch_threads']} threads, load {env['load_average_at_start'][0]:.2f})"
    )
    synthetic = []
    for d_out, d_in in SYNTHETIC:
        phases = [
            "cosine_factored",
            "cosine_dense",
            f"svd_factored_{N_ADAPTERS * RANK}",
            "svd_factored_16",
        ]
        if not (args.quick and d_out > 4096):
            phases.append("svd_dense")
        by_phase = {}
        for phase in phases:
            by_phase[phase] = phase_in_subprocess(phase, d_out, d_in)
            print(
                f"  {d_out}x{d_in} {phase}: {by_phase[phase]['seconds'] * 1e3:.1f} ms", flush=True
            )
        synthetic.append({"shape": f"{d_out}x{d_in}", "phases": by_phase})
    print("default-model shapes ...", flush=True)
    default_rows = bench_default_model()

    bound = {
        s["shape"]: N_ADAPTERS * RANK * sum(int(x) for x in s["shape"].split("x")) * 8 / 2**20
        for s in synthetic
    }
    print()
    print(
        f"| {'shape, 3 adapters r=16':<24} | {'what':<44} | {'time':>10} | "
        f"{'peak extra RSS':>14} | {'error':>9} | {'speed-up':>8} |"
    )
    print(f"|{'-' * 26}|{'-' * 46}|{'-' * 12}|{'-' * 16}|{'-' * 11}|{'-' * 10}|")
    labels = {
        "cosine_factored": "cosine, factored",
        "cosine_dense": "cosine, dense ΔW",
        f"svd_factored_{N_ADAPTERS * RANK}": "svd K=48 (=Σr), factored QR + core SVD",
        "svd_factored_16": "svd K=16, factored",
        "svd_dense": "svd, dense Σ ΔW + torch.linalg.svd",
    }
    for s in synthetic:
        ph = s["phases"]
        for phase, row in ph.items():
            ref = {"cosine_factored": "cosine_dense"}.get(phase)
            if phase.startswith("svd_factored"):
                ref = "svd_dense"
            speedup = (ph[ref]["seconds"] / row["seconds"]) if ref in ph else None
            row["speedup_vs_dense"] = speedup
            err = row.get("abs_error", row.get("relative_error"))
            t = row["seconds"]
            t_text = f"{t * 1e3:.2f} ms" if t < 1 else f"{t:.1f} s"
            print(
                f"| {s['shape']:<24} | {labels[phase]:<44} | {t_text:>10} | "
                f"{row['peak_extra_mb']:>11.1f} MB | {err:>9.1e} | "
                f"{'' if speedup is None else f'{speedup:,.0f}×':>8} |"
            )
    print(
        "(factored bound Σr·(d_out+d_in)·8 B: "
        + ", ".join(f"{k}: {v:.1f} MB" for k, v in bound.items())
        + ")"
    )
    print()
    print(
        f"| {'default-model shapes (SmolLM2-135M, 150 modules), 3 adapters r=4':<70} | "
        f"{'time':>9} |"
    )
    print(f"|{'-' * 72}|{'-' * 11}|")
    for row in default_rows:
        extra = f" (min kept {row['min_kept']:.4f})" if row.get("min_kept", 1.0) < 1 else ""
        print(f"| {row['what'] + extra:<70} | {row['seconds'] * 1e3:>6.0f} ms |")

    result = {
        "environment": env,
        "synthetic": synthetic,
        "factored_bound_mb": bound,
        "default_model": default_rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
