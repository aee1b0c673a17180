"""A real llama.cpp check of lorasum's GGUF exports (`make serve-check`).

    .venv/bin/python benchmarks/serve_check.py --llama-python .venv-serve/bin/python

On the embedded default model (SmolLM2-135M, Q4_1 GGUF) and the test rows of two builtin
domains: trains two small adapters (`lorasum train`), composes their sum (`lorasum compose
--format gguf`), exports each (`lorasum export`) and the sum baked into the base
(`lorasum export --merged`, in the base's Q4_1 and in f32), then scores answer-only NLL on the
same token ids

- with lorasum's own evaluation (`lorasum.evaluate`, fp32 torch, the dequantised GGUF), and
- in llama.cpp (llama-cpp-python, run by benchmarks/serve_llamacpp.py in its own venv):
  base; one adapter through --lora; the composed sum as one GGUF adapter; the two adapters
  loaded together at runtime (llama.cpp sums them); the merged model files.

Prints a markdown table and writes runs/serve-check/serve_check.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

DOMAINS = ("math", "medicine")
# the quick preset's adapter settings (`lorasum reproduce --preset quick`)
TRAIN = [
    "--max-train",
    "48",
    "--max-length",
    "64",
    "--lr",
    "2e-4",
    "--warmup-steps",
    "2",
    "--seed",
    "42",
]


def lorasum(*args: str) -> None:
    cmd = [sys.executable, "-m", "lorasum.cli", *args]
    print("$ lorasum " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True)


def build_files(out: Path) -> dict[str, Path]:
    """Adapters, their GGUF exports, the composed sum and the merged models (reused if there)."""
    files: dict[str, Path] = {}
    for d in DOMAINS:
        files[d] = out / "adapters" / d
        if not (files[d] / "lorasum.json").is_file():
            lorasum("train", "--data", d, "--out", str(files[d]), *TRAIN)
        files[d + ".gguf"] = out / "gguf" / d / f"{d}.gguf"
        lorasum("export", str(files[d]), "--out", str(files[d + ".gguf"]), "--overwrite")
    files["sum"] = out / "sum"
    lorasum(
        "compose",
        *(str(files[d]) for d in DOMAINS),
        "--out",
        str(files["sum"]),
        "--format",
        "gguf",
        "--overwrite",
    )
    files["sum.gguf"] = files["sum"] / "gguf" / "adapter.gguf"
    for outtype in ("base", "f32"):
        path = out / "merged" / outtype / f"merged-{outtype}.gguf"
        lorasum(
            "export",
            str(files["sum"]),
            "--merged",
            "--out",
            str(path),
            "--outtype",
            outtype,
            "--overwrite",
        )
        files["merged-" + outtype] = path
    return files


def test_items(rows: int, max_length: int) -> list[dict]:
    """The test rows lorasum evaluates, as token ids and the counted (answer) positions."""
    from lorasum.data import load_split, tokenize_split
    from lorasum.models import load_tokenizer

    sources = [load_split(d, 42, None, None, None, rows) for d in DOMAINS]
    items = tokenize_split(load_tokenizer("default"), sources, "test", max_length, True)
    return [{"ids": t.input_ids, "counted": t.counted} for t, _ in items]


def lorasum_nll(adapter: Path | None, rows: int, max_length: int) -> dict:
    from lorasum.evaluate import evaluate

    t0 = time.perf_counter()
    r = evaluate(
        "default",
        list(DOMAINS),
        adapter=str(adapter) if adapter else None,
        max_length=max_length,
        max_eval=rows,
        precision="fp32",
        progress=False,
    )
    return {
        "nll": r["nll"] / r["tokens"],
        "tokens": r["tokens"],
        "seconds": r["timing"]["seconds"],
        "wall": time.perf_counter() - t0,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--llama-python", required=True, help="python of the llama-cpp-python venv")
    p.add_argument("--out", default="runs/serve-check")
    p.add_argument("--rows", type=int, default=20, help="test rows per domain")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    from lorasum.models import embedded_gguf_path

    out = Path(args.out)
    files = build_files(out)
    base = embedded_gguf_path()
    weights = json.loads((files["sum"] / "lorasum.json").read_text())["recipe"]["weights"]
    runtime = [[str(files[d + ".gguf"]), w] for d, w in zip(DOMAINS, weights, strict=True)]
    # (name, lorasum adapter, llama.cpp model, llama.cpp adapters [(path, scale)])
    configs = [
        ("base", None, base, []),
        (f"one adapter ({DOMAINS[0]}) via lora", files[DOMAINS[0]], base,
         [[str(files[DOMAINS[0] + ".gguf"]), 1.0]]),
        ("composed sum, one GGUF adapter", files["sum"], base, [[str(files["sum.gguf"]), 1.0]]),
        ("two adapters at runtime", files["sum"], base, runtime),
        ("merged model (Q4_1, requantised)", files["sum"], files["merged-base"], []),
        ("merged model (f32)", files["sum"], files["merged-f32"], []),
    ]  # fmt: skip
    items = test_items(args.rows, args.max_length)
    spec = {
        "items": items,
        "threads": args.threads,
        "configs": [{"name": n, "model": str(m), "loras": lo} for n, _, m, lo in configs],
    }
    (out / "spec.json").write_text(json.dumps(spec))
    script = Path(__file__).with_name("serve_llamacpp.py")
    # llama.cpp's OpenMP threads spin while waiting: on a shared, busy CPU that made every
    # row 10× slower here; passive waiting keeps the timing about the model.
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "passive")}
    proc = subprocess.run(
        [args.llama_python, str(script), str(out / "spec.json")],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    )
    llama = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = []
    for (name, adapter, _, _), lc in zip(configs, llama["results"], strict=True):
        ref = lorasum_nll(adapter, args.rows, args.max_length)
        if ref["tokens"] != lc["tokens"]:
            raise SystemExit(
                f"{name}: {ref['tokens']} tokens in lorasum, {lc['tokens']} in llama.cpp"
            )
        rows.append({"configuration": name, "lorasum": ref, "llamacpp": lc})
    result = {
        "rows": rows,
        "items": len(items),
        "llama_cpp_python": llama["version"],
        "model": str(base),
        "domains": DOMAINS,
    }
    (out / "serve_check.json").write_text(json.dumps(result, indent=2))
    print_table(result)


def print_table(result: dict) -> None:
    print(
        f"\n{result['items']} test rows ({', '.join(result['domains'])}), "
        f"{result['rows'][0]['lorasum']['tokens']} answer tokens; "
        f"llama-cpp-python {result['llama_cpp_python']}\n"
    )
    print(
        "| configuration | NLL lorasum | NLL llama.cpp | relative diff | time lorasum | "
        "time llama.cpp |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for r in result["rows"]:
        a, b = r["lorasum"]["nll"], r["llamacpp"]["nll"]
        print(
            f"| {r['configuration']} | {a:.4f} | {b:.4f} | {(b - a) / a:+.2%} | "
            f"{r['lorasum']['seconds']:.2f} s | {r['llamacpp']['seconds']:.2f} s |"
        )


if __name__ == "__main__":
    main()
