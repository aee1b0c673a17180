"""Cost and values of the adapter-free gradient predictors on the embedded default model.

Computes `lorasum.analysis.predictors.data.gradient_statistics` (mean gradients of each domain's answer-only
loss at the auto target modules, one forward+backward per module group) for builtin domains,
in a fresh cache directory, and prints seconds, peak RSS (``getrusage``) and the pairwise
gradient cosines and base losses; writes JSON (default:
benchmarks/results/gradient_predictors.json). Not a test: the numbers depend on the machine.

    .venv/bin/python benchmarks/gradient_predictors.py --domains math,medicine,finance \\
        --max-train 64 --max-length 64
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--domains", default="math,medicine,finance")
    p.add_argument("--max-train", type=int, default=64)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--max-bytes", type=int, default=256 * 2**20)
    p.add_argument("--batch-size", type=int, default=4, help="rows per forward+backward")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/gradient_predictors.json"))
    args = p.parse_args()

    import torch

    from lorasum.analysis.gradients import module_groups, target_module_names
    from lorasum.analysis.predictors.data import gradient_statistics
    from lorasum.data import load_split
    from lorasum.models import cpu_name, load_model, load_tokenizer

    names = [d.strip() for d in args.domains.split(",") if d.strip()]
    sources = {n: load_split(n, 42, max_train=args.max_train) for n in names}
    tokenizer, model = load_tokenizer("default"), load_model("default")
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    shapes = target_module_names(model, "auto")
    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        stats = gradient_statistics(
            model,
            tokenizer,
            sources,
            args.max_length,
            "auto",
            model_spec="default",
            max_bytes=args.max_bytes,
            batch_size=args.batch_size,
            cache_dir=cache,
        )
        seconds = time.perf_counter() - t0
        disk = sum(f.stat().st_size for f in Path(cache).rglob("*") if f.is_file())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = {
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "domains": names,
        "max_train": args.max_train,
        "max_length": args.max_length,
        "batch_size": args.batch_size,
        "modules": len(shapes),
        "groups": len(module_groups(shapes, args.max_bytes)),
        "seconds": seconds,
        "peak_rss_mb": peak,
        "rss_after_loading_mb": rss_loaded,
        "cache_mb": disk / 2**20,
        "tokens": stats["tokens"],
        "base_loss": stats["loss"],
        "pairs": {
            f"{a}+{b}": {k: stats[k][i][j] for k in ("rms", "mean", "global")}
            for i, a in enumerate(names)
            for j, b in enumerate(names)
            if i < j
        },
    }
    print(
        f"{len(names)} domains × {args.max_train} rows, max length {args.max_length}, "
        f"{out['modules']} modules in {out['groups']} group(s): {seconds:.1f} s, peak RSS "
        f"{peak:.0f} MB (after loading the model {rss_loaded:.0f} MB), cache {out['cache_mb']:.0f} MB"
    )
    print(f"{'pair':<24} {'RMS cos':>8} {'mean cos':>9} {'global':>8}")
    for pair, v in out["pairs"].items():
        print(f"{pair:<24} {v['rms']:8.4f} {v['mean']:+9.4f} {v['global']:+8.4f}")
    print("base loss: " + ", ".join(f"{n} {v:.4f}" for n, v in stats["loss"].items()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
