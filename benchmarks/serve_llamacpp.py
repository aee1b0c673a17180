"""The llama.cpp side of benchmarks/serve_check.py, run in the llama-cpp-python venv.

    .venv-serve/bin/python benchmarks/serve_llamacpp.py SPEC.json

SPEC: {"items": [{"ids": [...], "counted": [...]}], "threads": N,
       "configs": [{"name": ..., "model": base.gguf, "loras": [[adapter.gguf, scale], ...]}]}.
For every config: loads the model, applies its LoRA adapters at runtime through llama.cpp's
own adapter API (several at once: llama.cpp adds their ΔW), evaluates every row's token ids
with all logits kept, and sums -log p(token) over the counted (answer) positions. Prints one
JSON line: {"version": ..., "results": [{"nll": mean per token, "tokens", "seconds"}, ...]}.
Needs only numpy and llama_cpp (no torch, no lorasum).
"""

from __future__ import annotations

import ctypes
import json
import sys
import time

import llama_cpp
import numpy as np


def apply_loras(llm, loras: list) -> list:
    """Load and activate adapters on the context; returns the adapter handles (kept alive)."""
    handles = [llama_cpp.llama_adapter_lora_init(llm.model, path.encode()) for path, _ in loras]
    if any(not h for h in handles):
        raise SystemExit(f"llama.cpp could not load an adapter of {loras}")
    if not handles:
        return handles
    if hasattr(llama_cpp, "llama_set_adapters_lora"):  # the whole set in one call
        arr = (llama_cpp.llama_adapter_lora_p_ctypes * len(handles))(*handles)
        scales = (ctypes.c_float * len(handles))(*(float(s) for _, s in loras))
        if llama_cpp.llama_set_adapters_lora(llm.ctx, arr, len(handles), scales) != 0:
            raise SystemExit("llama_set_adapters_lora failed")
    else:  # older llama.cpp: one call per adapter, each added to the set
        for h, (_, scale) in zip(handles, loras, strict=True):
            if llama_cpp.llama_set_adapter_lora(llm.ctx, h, float(scale)) != 0:
                raise SystemExit("llama_set_adapter_lora failed")
    return handles


def row_nll(llm, ids: list[int], counted: list[bool]) -> tuple[float, int]:
    """Σ -log p(ids[t] | ids[:t]) over counted t, from llama.cpp's logits."""
    llm.reset()
    llm.eval(ids)
    logits = np.asarray(llm.scores[: len(ids)], dtype=np.float64)  # (T, V)
    pos = np.array([t for t in range(1, len(ids)) if counted[t]])
    rows = logits[pos - 1]  # (N, V): the logits that predict token t
    top = rows.max(axis=1, keepdims=True)
    logz = np.log(np.exp(rows - top).sum(axis=1)) + top[:, 0]
    return float((logz - rows[np.arange(len(pos)), np.array(ids)[pos]]).sum()), len(pos)


def run(config: dict, items: list[dict], threads: int) -> dict:
    n_ctx = max(len(i["ids"]) for i in items) + 8
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(
        model_path=config["model"],
        n_ctx=n_ctx,
        n_batch=n_ctx,
        n_threads=threads,
        logits_all=True,
        verbose=False,
    )
    handles = apply_loras(llm, config["loras"])
    loaded = time.perf_counter()
    nll, tokens = 0.0, 0
    for item in items:
        n, k = row_nll(llm, item["ids"], item["counted"])
        nll, tokens = nll + n, tokens + k
    seconds = time.perf_counter() - loaded
    del handles
    return {"nll": nll / tokens, "tokens": tokens, "seconds": seconds, "load": loaded - t0}


def main() -> None:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    results = [run(c, spec["items"], spec["threads"]) for c in spec["configs"]]
    print(json.dumps({"version": llama_cpp.__version__, "results": results}))


if __name__ == "__main__":
    main()
