"""Benchmark: factored vs dense similarity, and train/eval throughput on the default model.

Prints a table and writes JSON (default: runs/bench.json). Not a test: numbers depend on the machine.

    .venv/bin/python benchmarks/bench.py [--steps 4] [--out runs/bench.json] [--skip-model]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lorasum.factors import LoraFactors, cosine, delta


def bench_similarity(d_out: int, d_in: int, r: int, repeat: int = 5) -> dict:
    g = torch.Generator().manual_seed(0)
    f1 = LoraFactors(torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g), 16.0)
    f2 = LoraFactors(torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g), 16.0)
    t = time.perf_counter()
    for _ in range(repeat):
        c_fact = cosine(f1, f2)
    factored = (time.perf_counter() - t) / repeat
    t = time.perf_counter()
    for _ in range(repeat):
        a, b = delta(f1.A, f1.B, f1.scale).flatten(), delta(f2.A, f2.B, f2.scale).flatten()
        c_dense = float(a @ b / (a.norm() * b.norm()))
    dense = (time.perf_counter() - t) / repeat
    return {
        "shape": f"{d_out}x{d_in} r={r}",
        "factored_ms": factored * 1e3,
        "dense_ms": dense * 1e3,
        "speedup": dense / factored,
        "abs_diff": abs(c_fact - c_dense),
        "dense_bytes": 2 * d_out * d_in * 4,
    }


def bench_model(steps: int, max_length: int, batch_size: int) -> dict:
    from lorasum.data import load_split, make_batches, tokenize_split
    from lorasum.evaluate import evaluate_batches
    from lorasum.models import autocast_dtype, load_model, load_tokenizer, pick_device
    from lorasum.train import TrainConfig, train

    t = time.perf_counter()
    tokenizer, model = load_tokenizer("default"), load_model("default")
    load_s = time.perf_counter() - t
    out = Path("runs/bench-adapter")
    cfg = TrainConfig(
        data=["math"],
        max_steps=steps,
        batch_size=batch_size,
        max_length=max_length,
        max_train=steps * batch_size,
        eval_val=False,
    )
    marker = train(cfg, out, overwrite=True, model=model, tokenizer=tokenizer, progress=False)
    m = marker["metrics"]
    device = pick_device("auto")
    src = load_split("medicine", 42, max_eval=32)
    batches = make_batches(
        tokenize_split(tokenizer, [src], "test", max_length),
        16,
        tokenizer.pad_token_id,
        shuffle=False,
    )
    import lorasum.evaluate as ev

    amp = autocast_dtype("auto", device)
    t = time.perf_counter()
    fast = evaluate_batches(model, batches, ["medicine"], device, amp)
    eval_s = time.perf_counter() - t
    plain, ev.PLAIN_HEAD_TYPES = ev.PLAIN_HEAD_TYPES, frozenset()  # the model's own full forward
    try:
        t = time.perf_counter()
        full = evaluate_batches(model, batches, ["medicine"], device, amp)
        full_s = time.perf_counter() - t
    finally:
        ev.PLAIN_HEAD_TYPES = plain
    assert abs(fast["perplexity"] - full["perplexity"]) < 1e-3 * full["perplexity"]
    eval_tokens = sum(int(b.attention_mask.sum()) for b in batches)
    return {
        "load_s": load_s,
        "train_steps": m["steps"],
        "train_s_per_step": m["seconds"] / m["steps"],
        "train_tokens_per_s": m["tokens_per_second"],
        "precision": m["precision"],
        "eval_tokens_per_s": eval_tokens / eval_s,
        "eval_full_head_tokens_per_s": eval_tokens / full_s,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", default="runs/bench.json")
    p.add_argument("--skip-model", action="store_true")
    args = p.parse_args()
    sims = [
        bench_similarity(576, 576, 4),
        bench_similarity(1536, 576, 4),
        bench_similarity(4096, 4096, 16),
        bench_similarity(8192, 8192, 64, repeat=2),
    ]
    print(f"{'ΔW shape':<22}{'factored ms':>12}{'dense ms':>10}{'speedup':>9}{'|Δcos|':>10}")
    for s in sims:
        print(
            f"{s['shape']:<22}{s['factored_ms']:>12.3f}{s['dense_ms']:>10.2f}{s['speedup']:>9.0f}"
            f"{s['abs_diff']:>10.1e}"
        )
    result = {"similarity": sims}
    if not args.skip_model:
        m = bench_model(args.steps, args.max_length, args.batch_size)
        print(
            f"default model: load {m['load_s']:.1f} s, train {m['train_s_per_step']:.2f} s/step "
            f"({m['train_tokens_per_s']:.0f} tok/s, {m['precision']}, batch {args.batch_size}x"
            f"≤{args.max_length}), eval {m['eval_tokens_per_s']:.0f} tok/s (full vocabulary head "
            f"on every position: {m['eval_full_head_tokens_per_s']:.0f} tok/s), "
            f"{m['threads']} threads"
        )
        result["model"] = m
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
