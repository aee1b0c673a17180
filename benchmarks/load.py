"""Load check: peak memory of compose over 50 adapters, similarity over 20 (190 pairs) and
eval over 100,000 examples, each next to a smaller run of the same kind, so the table shows how
memory grows with the input. Prints a table and writes JSON (default:
benchmarks/results/load.json). Not a test: the numbers depend on the machine.

    make load            # = .venv/bin/python benchmarks/load.py
    .venv/bin/python benchmarks/load.py --quick   # the small sizes only (a minute)

Each measurement runs in a fresh process (``--child``) and reports its own peak RSS
(``getrusage``'s ru_maxrss) and its RSS after importing lorasum, torch, transformers and
PEFT, before any work (the "baseline"); inputs are made beforehand by this parent process.

- compose: N synthetic adapters with the default model's shapes (SmolLM2-135M: 30 layers ×
  q, k, v, o, down; r = 4; 3.1 MB of fp32 factors each), `lorasum.compose` (exact sum, rank 4N)
  to disk;
- similarity: `lorasum.analysis.similarity` over N such adapters (N(N-1)/2 pairs, principal angles);
- eval: `lorasum.evaluate` of a tiny random llama (as in the tests) on the train split of a
  synthetic QA .jsonl with N examples in it (batches of 64).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {  # module -> (d_out, d_in), SmolLM2-135M
    "self_attn.q_proj": (576, 576),
    "self_attn.k_proj": (192, 576),
    "self_attn.v_proj": (192, 576),
    "self_attn.o_proj": (576, 576),
    "mlp.down_proj": (576, 1536),
}
LAYERS, RANK = 30, 4


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


# --- inputs (made by the parent) -------------------------------------------------------------


def write_adapter(out: Path, seed: int) -> Path:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(LAYERS):
        for name, (d_out, d_in) in SHAPES.items():
            key = f"base_model.model.model.layers.{layer}.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(RANK, d_in, generator=g) / d_in**0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(d_out, RANK, generator=g) * 0.01
    out.mkdir(parents=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": RANK,
        "lora_alpha": 2 * RANK,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
        "base_model_name_or_path": "default",
        "fan_in_fan_out": False,
    }
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def make_adapters(d: Path, n: int) -> list[Path]:
    return [
        p if p.exists() else write_adapter(p, seed)
        for seed, p in ((i, d / f"adapter-{i:03d}") for i in range(n))
    ]


def make_eval_inputs(d: Path, n_examples: int) -> tuple[Path, Path]:
    """A tiny random llama (as in the tests) and a .jsonl whose train split has n_examples."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import build_tiny_model  # tiny random model + BPE tokenizer, no network

    model = d / "tiny-llama"
    if not model.exists():
        build_tiny_model("llama", model)
    rows = round(n_examples / 0.8)  # the 80 % train split holds n_examples
    data = d / f"qa-{n_examples}.jsonl"
    rng = random.Random(0)
    with open(data, "w") as f:
        for i in range(rows):
            a, b = rng.randint(1, 999), rng.randint(1, 999)
            f.write(json.dumps({"question": f"What is {a} plus {b}? ({i})", "answer": str(a + b)}))
            f.write("\n")
    return model, data


# --- measurements (each in its own process) ---------------------------------------------------


def child(kind: str, args: list[str]) -> dict:
    import peft  # noqa: F401  (imported before the baseline: libraries are not the workload)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    from lorasum.analysis.similarity import similarity
    from lorasum.compose import compose
    from lorasum.evaluate import evaluate

    torch.set_num_threads(1)
    baseline = rss_mb()
    t0 = time.perf_counter()
    info: dict = {}
    if kind == "compose":
        *paths, out = args
        marker = compose(paths, out)
        info = {"adapters": len(paths), "rank": marker["recipe"]["rank"]}
    elif kind == "similarity":
        result = similarity(args)
        info = {"adapters": len(args), "pairs": len(result["pairs"])}
    else:
        model, data, n = args
        result = evaluate(
            model=model,
            data=[data],
            split="train",
            batch_size=64,
            precision="fp32",
            device="cpu",
            progress=False,
        )
        info = {"examples": int(n), "tokens": result["tokens"], "perplexity": result["perplexity"]}
    return {
        "seconds": time.perf_counter() - t0,
        "baseline_rss_mb": baseline,
        "peak_rss_mb": peak_mb(),
        **info,
    }


def measure(kind: str, args: list[str]) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", kind, *map(str, args)],
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "PYTHONPATH": str(ROOT / "src")},
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} failed:\n{proc.stderr[-3000:]}")
    return {"what": kind, **json.loads(proc.stdout.strip().splitlines()[-1])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "load.json"))
    p.add_argument("--quick", action="store_true", help="small sizes only")
    p.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1:])))
        return

    compose_sizes, similarity_sizes, eval_sizes = [5, 50], [5, 20], [10_000, 100_000]
    if args.quick:
        compose_sizes, similarity_sizes, eval_sizes = [5, 10], [5], [10_000]
    rows = []
    with tempfile.TemporaryDirectory(prefix="lorasum-load-") as tmp:
        d = Path(tmp)
        adapters = make_adapters(d / "adapters", max(compose_sizes + similarity_sizes))
        for n in compose_sizes:
            rows.append(measure("compose", [*adapters[:n], d / f"sum-{n}"]))
        for n in similarity_sizes:
            rows.append(measure("similarity", adapters[:n]))
        for n in eval_sizes:
            model, data = make_eval_inputs(d, n)
            rows.append(measure("eval", [model, data, n]))
            data.unlink()

    print(
        f"{'what':<11} {'size':>22} {'time s':>8} {'baseline MB':>12} {'peak MB':>9} {'extra MB':>9}"
    )
    for r in rows:
        size = (
            f"{r['adapters']} adapters, rank {r['rank']}"
            if r["what"] == "compose"
            else f"{r['adapters']} adapters, {r['pairs']} pairs"
            if r["what"] == "similarity"
            else f"{r['examples']:,} examples"
        )
        extra = r["peak_rss_mb"] - r["baseline_rss_mb"]
        print(
            f"{r['what']:<11} {size:>22} {r['seconds']:>8.1f} {r['baseline_rss_mb']:>12.0f} "
            f"{r['peak_rss_mb']:>9.0f} {extra:>9.0f}"
        )
    import torch

    from lorasum.models import cpu_name

    meta = {"cpu": cpu_name(), "torch": torch.__version__, "python": platform.python_version()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": meta, "rows": rows}, indent=2) + "\n")
    print(f"CPU: {meta['cpu']}; JSON: {args.out}")


if __name__ == "__main__":
    main()
