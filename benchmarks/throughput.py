"""Throughput: lorasum vs the paper's pipeline (HF Trainer + PEFT), side by side in one run.

    .venv/bin/python benchmarks/throughput.py [--steps 6] [--eval-rows 24] [--repeats 2]
        [--device cpu|cuda]

Both sides use the default model, the same rows (the study's three domains, mixed), LoRA r=4,
alpha=64, dropout 0.1, targets `auto`, batch 8, max length 128, lr 1e-4, seed 0.

- (a) baseline train: `transformers.Trainer` + `peft.get_peft_model`, fp32, every row padded to
  max length (`padding="max_length"`), labels = input ids with padding set to -100, otherwise
  Trainer defaults;
- (b) `lorasum.training.train` with the same settings;
- (c) baseline eval: the HF model's forward (full logits, its own loss) on padded batches of 8;
- (d) `lorasum.evaluate` on the same rows and adapter.

Each side runs in its own subprocess (so peak RSS is its own), alternating A B A B so machine
drift cancels; the table shows medians. Tokens/s counts real (non-padding) tokens only: a
training side's rate is the real tokens of its steps after the first over their time, taken as
the median time per computed position times their positions (`_train_result`: lorasum's
length-grouped steps differ in size; for the baseline's equal steps it is the median step). After
training, both sides' adapters are scored with the same honest evaluator: answer-only and
full-sequence test perplexity. Writes benchmarks/results/throughput.json and prints a table.

The matmul peak (the model's projection shapes, `side_peak`) is read before every repeat's
train and eval sides and once at the end (on a CPU; a GPU once): shares of the peak are of the
best reading, since one reading taken while a shared machine was slow flatters every share
(readings ranged 136-177 GFLOP/s over one day on a 2-core EPYC); each side's median share of
the reading taken just before it is printed too.

``--device cuda`` runs every side on the GPU (the baseline Trainer without ``use_cpu``, lorasum
with its own precision choice there: bf16 where the GPU supports it), adds each side's peak GPU
memory (``torch.cuda.max_memory_allocated``) and leaves out the two-processes runs (a study on
GPUs runs one worker per GPU, not two on one). The default, ``cpu``, is the CPU benchmark.

On a CPU two more lorasum training sides run beside (b), on the same rows: two independent
trainings at once with one thread each (how `reproduce`'s workers train), and one training on
two one-thread processes under torchrun (DDP over gloo; docs/SCALE.md), whose rate is its global
batches' real tokens over rank 0's step times.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DOMAINS = ["math", "medicine", "finance"]
SETTINGS = dict(rank=4, alpha=64.0, dropout=0.1, batch_size=8, max_length=128, lr=1e-4, seed=0)


def _set_threads() -> None:
    """A side run as one of `reproduce`'s workers uses the thread count those get (1 on 2 cores)."""
    threads = int(os.environ.get("LORASUM_BENCH_THREADS", "0"))
    if threads:
        import torch

        torch.set_num_threads(threads)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _with_gpu_peak(result: dict, device: str) -> dict:
    """On a GPU, the side's peak GPU memory (MiB) joins its result; on a CPU nothing changes."""
    if device == "cuda":
        import torch

        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _sources(rows_per_domain: int, eval_rows: int):
    from lorasum.data import load_split

    return [load_split(d, 42, max_train=rows_per_domain, max_eval=eval_rows) for d in DOMAINS]


def _padded_rows(tokenizer, sources, split: str) -> list[dict]:
    """The paper pipeline's rows: full text, padded to max length, labels = ids (padding -100)."""
    from lorasum.data import answer_text, prompt_text

    texts = [
        prompt_text(qa.question) + answer_text(qa.answer) + tokenizer.eos_token
        for s in sources
        for qa in s.splits[split]
    ]
    enc = tokenizer(
        texts,
        padding="max_length",
        truncation=True,
        max_length=SETTINGS["max_length"],
        return_tensors="pt",
    )
    labels = enc["input_ids"].clone()
    labels[enc["attention_mask"] == 0] = -100
    return [
        {"input_ids": i, "attention_mask": m, "labels": lab}
        for i, m, lab in zip(enc["input_ids"], enc["attention_mask"], labels, strict=True)
    ]


def side_train_baseline(a: argparse.Namespace, bf16: bool = False) -> dict:
    """(a); ``bf16``: the same with `TrainingArguments(bf16=True)` (bf16 autocast)."""
    _set_threads()
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

    from lorasum.models import load_model, load_tokenizer, resolve_target_modules

    tokenizer, model = load_tokenizer("default"), load_model("default")
    rows = _padded_rows(tokenizer, _sources(a.rows, a.eval_rows), "train")
    torch.manual_seed(SETTINGS["seed"])
    peft_model = get_peft_model(
        model,
        LoraConfig(
            r=SETTINGS["rank"],
            lora_alpha=SETTINGS["alpha"],
            lora_dropout=SETTINGS["dropout"],
            target_modules=resolve_target_modules(model, "auto"),
            task_type="CAUSAL_LM",
        ),
    )
    step_times: list[float] = []
    batches: list[tuple[int, int]] = []  # (real tokens, positions) of each batch, in step order

    def collate(features):
        batch = default_data_collator(features)
        batches.append((int(batch["attention_mask"].sum()), batch["input_ids"].numel()))
        return batch

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            step_times.append(time.perf_counter() - self.t)

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            per_device_train_batch_size=SETTINGS["batch_size"],
            learning_rate=SETTINGS["lr"],
            warmup_steps=2,
            weight_decay=0.01,
            max_steps=a.steps,
            seed=SETTINGS["seed"],
            report_to=[],
            save_strategy="no",
            logging_strategy="no",
            use_cpu=a.device == "cpu",
            bf16=bf16,
            disable_tqdm=True,
        )
        trainer = Trainer(
            model=peft_model,
            args=args,
            train_dataset=rows,
            data_collator=collate,
            callbacks=[Clock()],
        )
        t0 = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - t0
    peft_model.save_pretrained(a.adapter_out)
    real = [r for r, _ in batches[: a.steps]]
    positions = [p for _, p in batches[: a.steps]]  # every position, padding included
    # HF computes the vocabulary projection at every position (full logits)
    return _with_gpu_peak(_train_result(step_times, wall, real, positions, positions), a.device)


def side_train_lorasum(a: argparse.Namespace) -> dict:
    _set_threads()
    from lorasum.io import read_json
    from lorasum.training import TrainConfig, train

    cfg = TrainConfig(
        data=DOMAINS,
        max_train=a.rows,
        max_eval=a.eval_rows,
        max_steps=a.steps,
        warmup_steps=2,
        weight_decay=0.01,
        eval_val=False,
        device=a.device,
        **SETTINGS,
    )
    t0 = time.perf_counter()
    marker = train(cfg, a.adapter_out, overwrite=True, progress=False)
    wall = time.perf_counter() - t0
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 writes the log
        return {}
    log = [json.loads(x) for x in (Path(a.adapter_out) / "train_log.jsonl").open()]
    out = _train_result(
        [r["seconds"] for r in log],
        wall,
        [r["real_tokens"] for r in log],
        [r["positions"] for r in log],
        [r["tokens"] for r in log],  # the head runs on counted positions only
    )
    out["precision"] = read_json(Path(a.adapter_out) / "lorasum.json")["metrics"]["precision"]
    del marker
    return _with_gpu_peak(out, a.device)


def _train_result(
    step_times: list[float],
    wall: float,
    real_tokens: list[int],
    positions: list[int],
    head_positions: list[int],
) -> dict:
    """A training side's rate: the real tokens of its timed steps over their time, the time
    taken as the median seconds per computed position times those steps' positions.

    The first step carries one-time costs (allocations, lazy init) on both sides and is left
    out. The median keeps one slow step of a shared machine from moving the rate, as the
    median step time did before; per position, because lorasum's length-grouped steps differ
    in size (384 to 1,024 positions) where the baseline pads every step to the same size, so
    for the baseline this is the earlier measure exactly. That earlier measure,
    ``tokens_per_s_median_step`` (all steps' mean real tokens over the median step's time), is
    kept for comparison: with steps of unequal size it counts a typical step's time against an
    average step's tokens. ``tokens_per_s_summed`` is the plain ratio of sums. Token and
    position counts are those of the timed steps, so `_roofline`'s FLOPs per real token times
    the rate is the FLOP rate of those steps."""
    if not len(step_times) == len(real_tokens) == len(positions) == len(head_positions):
        raise ValueError("one time and one count of each kind per step")
    timed = slice(1, None) if len(step_times) > 1 else slice(None)
    steps = len(step_times)
    per_position = statistics.median(
        t / p for t, p in zip(step_times[timed], positions[timed], strict=True)
    )
    real, computed = sum(real_tokens[timed]), sum(positions[timed])
    return {
        "s_per_step": statistics.median(step_times[timed]),
        "step_seconds": step_times,
        "real_tokens": real,
        "positions": computed,
        "head_positions": sum(head_positions[timed]),
        "steps": steps,
        "timed_steps": len(step_times[timed]),
        "tokens_per_s": real / (per_position * computed),
        "tokens_per_s_summed": real / sum(step_times[timed]),
        "tokens_per_s_median_step": sum(real_tokens) / steps / statistics.median(step_times[timed]),
        "wall_s": wall,
        "peak_rss_mb": _peak_rss_mb(),
    }


def side_eval_baseline(a: argparse.Namespace) -> dict:
    _set_threads()
    import torch
    from peft import PeftModel

    from lorasum.models import load_model, load_tokenizer

    tokenizer, model = load_tokenizer("default"), load_model("default", a.device)
    model = PeftModel.from_pretrained(model, a.adapter).eval()
    rows = _padded_rows(tokenizer, _sources(1, a.eval_rows), "test")
    bs = SETTINGS["batch_size"]
    nll, counted, real, positions = 0.0, 0, 0, 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for s in range(0, len(rows), bs):
            batch = {k: torch.stack([r[k] for r in rows[s : s + bs]]).to(a.device) for k in rows[0]}
            loss = model(**batch).loss
            n = int((batch["labels"][:, 1:] != -100).sum())
            nll += float(loss) * n
            counted += n
            real += int(batch["attention_mask"].sum())
            positions += batch["input_ids"].numel()
    seconds = time.perf_counter() - t0  # float(loss) above waited for the GPU
    result = {
        "seconds": seconds,
        "real_tokens": real,
        "tokens_per_s": real / seconds,
        "positions": positions,
        "head_positions": positions,
        "full_sequence_ppl": float(torch.tensor(nll / counted).exp()),
        "peak_rss_mb": _peak_rss_mb(),
    }
    return _with_gpu_peak(result, a.device)


def side_eval_lorasum(a: argparse.Namespace) -> dict:
    _set_threads()
    from lorasum.evaluate import evaluate

    t0 = time.perf_counter()
    r = evaluate(
        data=DOMAINS, adapter=a.adapter, max_eval=a.eval_rows, device=a.device, progress=False
    )
    seconds = time.perf_counter() - t0
    result = {
        "seconds": r["timing"]["seconds"],
        "seconds_with_load": seconds,
        "real_tokens": r["timing"]["real_tokens"],
        "tokens_per_s": r["timing"]["real_tokens"] / r["timing"]["seconds"],
        "positions": r["timing"]["positions"],
        "head_positions": r["tokens"],
        "answer_ppl": r["perplexity"],
        "peak_rss_mb": _peak_rss_mb(),
    }
    return _with_gpu_peak(result, a.device)


def side_score(a: argparse.Namespace) -> dict:
    """Test perplexity of a trained adapter, answer-only and full sequence, same evaluator."""
    from lorasum.evaluate import evaluate

    kw = dict(
        data=DOMAINS, adapter=a.adapter, max_eval=a.eval_rows, device=a.device, progress=False
    )
    return {
        "answer_ppl": evaluate(**kw)["perplexity"],
        "full_sequence_ppl": evaluate(**kw, answer_only=False)["perplexity"],
    }


def side_peak(a: argparse.Namespace) -> dict:
    """The default model's linear-layer sizes and this device's matmul rate at their shapes.

    The rate is the best of 5 timings of each distinct decoder projection on 1024 rows (one batch
    of 8 x 128), weighted by how many such layers the model has: what a forward pass could reach
    if nothing but its matrix products took time. In fp32; on a GPU also in bf16.
    """
    from collections import Counter

    import torch
    from torch import nn

    from lorasum.models import load_model

    _set_threads()
    model = load_model("default")
    head = model.get_output_embeddings()
    shapes = Counter(
        tuple(m.weight.shape) for m in model.modules() if isinstance(m, nn.Linear) and m is not head
    )
    out = {
        "threads": torch.get_num_threads(),
        "body_linear_params": sum(o * i * c for (o, i), c in shapes.items()),
        "head_params": head.weight.numel(),
        "linear_gflops": _linear_gflops(shapes, a.device, torch.float32),
    }
    if _bf16_pays(a.device == "cuda"):  # bf16 is real arithmetic here: its peak too
        out["linear_gflops_bf16"] = _linear_gflops(shapes, a.device, torch.bfloat16)
    return out


def _linear_gflops(shapes, device: str, dtype) -> float:
    """GFLOP/s of ``F.linear`` on 1024 rows at each (out, in) shape, weighted by its count."""
    import torch
    import torch.nn.functional as F

    rows, flops, seconds = 1024, 0.0, 0.0
    with torch.inference_mode():
        for (out_f, in_f), count in shapes.items():
            x = torch.randn(rows, in_f, device=device, dtype=dtype)
            w = torch.randn(out_f, in_f, device=device, dtype=dtype)
            F.linear(x, w)  # warm-up
            times = []
            for _ in range(5):
                _sync(device)
                t = time.perf_counter()
                F.linear(x, w)
                _sync(device)
                times.append(time.perf_counter() - t)
            flops += count * 2 * rows * out_f * in_f
            seconds += count * min(times)
    return flops / seconds / 1e9


def model_flops(kind: str, body: int, head: int, positions: int, head_positions: int) -> float:
    """Linear-layer FLOPs of a pass over ``positions`` (attention scores and LoRA left out).

    A forward costs 2 FLOPs per weight per position; training adds the backward's input gradient
    through every frozen weight (no weight gradient: they are frozen), another 2 per weight.
    The vocabulary projection runs on ``head_positions`` only.
    """
    per_weight = {"train": 4, "eval": 2}[kind]
    return per_weight * (body * positions + head * head_positions)


SIDES = {
    "train-baseline": side_train_baseline,
    "train-baseline-bf16": lambda a: side_train_baseline(a, bf16=True),
    "train-lorasum": side_train_lorasum,
    "eval-baseline": side_eval_baseline,
    "eval-lorasum": side_eval_lorasum,
    "score": side_score,
    "peak": side_peak,
}


def _side_cmd(name: str, a: argparse.Namespace, **extra) -> list[str]:
    cmd = [sys.executable, __file__, "--side", name, "--steps", str(a.steps)]
    cmd += ["--rows", str(a.rows), "--eval-rows", str(a.eval_rows), "--device", a.device]
    for k, v in extra.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    return cmd


def _side_env(threads: int = 0) -> dict:
    env = {**os.environ, "TQDM_DISABLE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    if threads:
        env["LORASUM_BENCH_THREADS"] = str(threads)
    return env


def _side_output(name: str, returncode: int, stdout: str, stderr: str) -> dict:
    if returncode != 0:
        sys.exit(f"side {name} failed:\n{stderr[-3000:]}")
    return json.loads(stdout.strip().splitlines()[-1])


def run_side(name: str, a: argparse.Namespace, threads: int = 0, **extra) -> dict:
    proc = subprocess.run(
        _side_cmd(name, a, **extra), capture_output=True, text=True, env=_side_env(threads)
    )
    return _side_output(name, proc.returncode, proc.stdout, proc.stderr)


def run_side_parallel(name: str, a: argparse.Namespace, copies: int, **extra) -> list[dict]:
    """``copies`` single-threaded processes of one side at once, as `reproduce`'s workers run."""
    procs = []
    for i in range(copies):
        kw = {k: f"{v}-{i}" for k, v in extra.items()}  # each copy writes its own output
        procs.append(
            subprocess.Popen(
                _side_cmd(name, a, **kw),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=_side_env(threads=1),
            )
        )
    outs = []
    for p in procs:
        stdout, stderr = p.communicate()
        outs.append(_side_output(name, p.returncode, stdout, stderr))
    return outs


def run_side_ddp(name: str, a: argparse.Namespace, ranks: int, **extra) -> dict:
    """One side on ``ranks`` one-thread processes under torchrun (one DDP training); rank 0's
    result: its log holds the global batches' tokens and its own step times."""
    cmd = _side_cmd(name, a, **extra)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    launcher += ["--nproc_per_node", str(ranks)]
    proc = subprocess.run(
        launcher + cmd[1:], capture_output=True, text=True, env=_side_env(threads=1)
    )
    return _side_output(name, proc.returncode, proc.stdout, proc.stderr)


def _best_peak(readings: list[dict]) -> dict:
    """The highest of the run's matmul-peak readings (fp32 and, where measured, bf16 each at
    its own best): what this machine could reach at best while the sides ran, so a share of it
    is never flattered by a reading taken while the machine was slow."""
    best = dict(max(readings, key=lambda r: r["linear_gflops"]))
    bf16 = [r["linear_gflops_bf16"] for r in readings if "linear_gflops_bf16" in r]
    if bf16:
        best["linear_gflops_bf16"] = max(bf16)
    return best


def _roofline(
    runs: dict,
    peak: dict,
    peak_1: dict,
    lorasum_bf16: bool = False,
    adjacent: dict[str, list[dict]] | None = None,
) -> dict:
    """FLOPs per real token of each side, and the share of the matmul peak each side reaches.

    ``flop_ratio`` (baseline FLOPs / lorasum FLOPs per real token) is the speedup lorasum would
    show if both sides ran their products equally fast: the part of the speedup that comes from
    doing less work (padding, the vocabulary projection) rather than doing it faster. Each
    side's share is of the peak of the precision it ran in (the baseline: fp32; lorasum: bf16
    where it chose bf16 and the bf16 peak was measured).

    ``peak`` is the best reading of the run (`_best_peak`); ``adjacent`` maps "train"/"eval" to
    the reading taken just before each repeat's sides of that kind, and gives each side's
    median per-repeat share of it too (``*_fraction_of_adjacent_peak``): the share with the
    machine's drift paired out, where the headline share is against the best reading.
    """
    body, head = peak["body_linear_params"], peak["head_params"]
    out = {
        "linear_gflops_peak": peak["linear_gflops"],
        "linear_gflops_peak_1_thread": peak_1["linear_gflops"],
        "linear_gflops_peak_bf16": peak.get("linear_gflops_bf16"),
    }
    for kind in ("train", "eval"):
        row = {}
        for side in ("baseline", "lorasum"):
            r = runs[f"{kind}-{side}"][0]  # FLOPs are the same in every repeat
            flops = model_flops(kind, body, head, r["positions"], r["head_positions"])
            row[f"{side}_gflop_per_token"] = flops / r["real_tokens"] / 1e9
            rates = [
                x["tokens_per_s"] * flops / r["real_tokens"] / 1e9 for x in runs[f"{kind}-{side}"]
            ]
            row[f"{side}_gflops"] = statistics.median(rates)
            bf16 = side == "lorasum" and lorasum_bf16 and "linear_gflops_bf16" in peak
            side_peak = peak["linear_gflops_bf16"] if bf16 else peak["linear_gflops"]
            row[f"{side}_peak_precision"] = "bf16" if bf16 else "fp32"
            row[f"{side}_fraction_of_peak"] = row[f"{side}_gflops"] / side_peak
            if adjacent and adjacent.get(kind):
                key = "linear_gflops_bf16" if bf16 else "linear_gflops"
                row[f"{side}_fraction_of_adjacent_peak"] = statistics.median(
                    rate / reading[key] for rate, reading in zip(rates, adjacent[kind], strict=True)
                )
        row["flop_ratio"] = row["baseline_gflop_per_token"] / row["lorasum_gflop_per_token"]
        out[kind] = row
    return out


def _bf16_pays(gpu: bool) -> bool:
    """Is bf16 real arithmetic here (a GPU with bf16, or a CPU with AMX/AVX512-BF16)?"""
    import torch

    if gpu:
        try:
            return torch.cuda.is_bf16_supported()
        except (AssertionError, RuntimeError):  # no usable CUDA build after all
            return False
    from lorasum.models import cpu_has_fast_bf16

    return cpu_has_fast_bf16()


def cpu_name() -> str:
    from lorasum.models import cpu_name

    return cpu_name()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per training side")
    p.add_argument("--rows", type=int, default=None, help="training rows per domain")
    p.add_argument("--eval-rows", type=int, default=24, help="test rows per domain")
    p.add_argument("--repeats", type=int, default=2, help="A B pairs per measurement")
    p.add_argument("--out", default="benchmarks/results/throughput.json")
    p.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="where every side runs (cuda: the GPU, with peak GPU memory; default cpu)",
    )
    p.add_argument("--side", choices=list(SIDES), help=argparse.SUPPRESS)
    p.add_argument("--adapter", help=argparse.SUPPRESS)
    p.add_argument("--adapter-out", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.rows is None:  # one epoch of `steps` batches over the three domains
        a.rows = -(-a.steps * SETTINGS["batch_size"] // len(DOMAINS))
    if a.side:
        result = SIDES[a.side](a)
        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun: rank 0's result only
            print(json.dumps(result))
        return

    import torch

    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: torch sees no CUDA GPU here; use --device cpu")
    gpu = a.device == "cuda"

    t_start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="lorasum-bench-"))
    runs: dict[str, list[dict]] = {k: [] for k in SIDES if k not in ("score", "peak")}
    train_sides = ("train-baseline", "train-lorasum")
    train_sides += () if gpu else ("train-lorasum-x2", "train-lorasum-ddp")
    bf16_baseline = _bf16_pays(gpu)  # the Trainer with bf16=True: only where bf16 is real
    if bf16_baseline:
        train_sides += ("train-baseline-bf16",)
    else:
        runs.pop("train-baseline-bf16", None)
    runs.update({"train-lorasum-x2": [], "train-lorasum-ddp": []} if not gpu else {})
    peaks: dict[str, list[dict]] = {"train": [], "eval": [], "end": []}  # readings over the run
    for i in range(a.repeats):
        if not gpu:  # the GPU's peak does not drift with the host's load: read once, at the end
            print(f"[{i + 1}/{a.repeats}] matmul peak …", file=sys.stderr, flush=True)
            peaks["train"].append(run_side("peak", a))
        for side in train_sides:
            print(f"[{i + 1}/{a.repeats}] {side} …", file=sys.stderr, flush=True)
            if side == "train-lorasum-x2":  # two trainings at once, 1 thread each (`reproduce`)
                both = run_side_parallel("train-lorasum", a, 2, adapter_out=work / f"x2-{i}")
                runs[side].append(
                    {
                        "tokens_per_s": sum(r["tokens_per_s"] for r in both),
                        "peak_rss_mb": max(r["peak_rss_mb"] for r in both),
                        "processes": both,
                    }
                )
                continue
            if side == "train-lorasum-ddp":  # one training on two 1-thread processes (torchrun)
                out_dir = work / f"ddp-{i}"
                runs[side].append(run_side_ddp("train-lorasum", a, 2, adapter_out=out_dir))
                continue
            runs[side].append(run_side(side, a, adapter_out=work / f"{side}-{i}"))
    adapter = work / "train-lorasum-0"
    for i in range(a.repeats):
        if not gpu:
            print(f"[{i + 1}/{a.repeats}] matmul peak …", file=sys.stderr, flush=True)
            peaks["eval"].append(run_side("peak", a))
        for side in ("eval-baseline", "eval-lorasum"):
            print(f"[{i + 1}/{a.repeats}] {side} …", file=sys.stderr, flush=True)
            runs[side].append(run_side(side, a, adapter=adapter))
    scores = {
        s: run_side("score", a, adapter=work / f"train-{s}-0") for s in ("baseline", "lorasum")
    }
    print("matmul peak …", file=sys.stderr, flush=True)
    peaks["end"].append(run_side("peak", a))
    readings = [r for part in peaks.values() for r in part]
    peak = _best_peak(readings)
    peak_1 = peak if gpu else run_side("peak", a, threads=1)  # threads: a CPU matter

    def med(side: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[side])

    table = {
        "train_s_per_step": (
            med("train-baseline", "s_per_step"),
            med("train-lorasum", "s_per_step"),
        ),
        "train_tokens_per_s": (
            med("train-baseline", "tokens_per_s"),
            med("train-lorasum", "tokens_per_s"),
        ),
        "train_tokens_per_s_median_step": (  # the measure before 2026-12-07 (`_train_result`)
            med("train-baseline", "tokens_per_s_median_step"),
            med("train-lorasum", "tokens_per_s_median_step"),
        ),
        "train_peak_rss_mb": (
            med("train-baseline", "peak_rss_mb"),
            med("train-lorasum", "peak_rss_mb"),
        ),
        "eval_tokens_per_s": (
            med("eval-baseline", "tokens_per_s"),
            med("eval-lorasum", "tokens_per_s"),
        ),
        "eval_peak_rss_mb": (
            med("eval-baseline", "peak_rss_mb"),
            med("eval-lorasum", "peak_rss_mb"),
        ),
        "test_answer_ppl_after_training": (
            scores["baseline"]["answer_ppl"],
            scores["lorasum"]["answer_ppl"],
        ),
        "test_full_sequence_ppl_after_training": (
            scores["baseline"]["full_sequence_ppl"],
            scores["lorasum"]["full_sequence_ppl"],
        ),
    }
    if gpu:
        for kind in ("train", "eval"):
            table[f"{kind}_peak_gpu_mb"] = (
                med(f"{kind}-baseline", "peak_gpu_mb"),
                med(f"{kind}-lorasum", "peak_gpu_mb"),
            )
    lorasum_bf16 = runs["train-lorasum"][0].get("precision") in ("bf16", "bfloat16")
    roofline = _roofline(runs, peak, peak_1, lorasum_bf16, adjacent=peaks)
    roofline["linear_gflops_peak_readings"] = [r["linear_gflops"] for r in readings]
    result = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "device": torch.cuda.get_device_name() if gpu else "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "settings": {**SETTINGS, "steps": a.steps, "rows_per_domain": a.rows},
        "eval_rows_per_domain": a.eval_rows,
        "lorasum_precision": runs["train-lorasum"][0].get("precision"),
        "table": {
            k: {
                "baseline": b,
                "lorasum": s,
                "ratio": s / b if any(x in k for x in ("ppl", "rss", "gpu")) else None,
            }
            for k, (b, s) in table.items()
        },
        "speedup": {
            "train": table["train_tokens_per_s"][1] / table["train_tokens_per_s"][0],
            "eval": table["eval_tokens_per_s"][1] / table["eval_tokens_per_s"][0],
        },
        "roofline": roofline,
        "runs": runs,
        "scores": scores,
        "wall_s": time.perf_counter() - t_start,
    }
    if bf16_baseline:
        b16 = med("train-baseline-bf16", "tokens_per_s")
        result["train_vs_baseline_bf16"] = {
            "baseline_bf16_tokens_per_s": b16,
            "lorasum_tokens_per_s": table["train_tokens_per_s"][1],
            "speedup": table["train_tokens_per_s"][1] / b16,
        }
    if not gpu:
        two_rate = med("train-lorasum-x2", "tokens_per_s")
        # the two processes together, against the same (best, 2-thread) peak as the headline
        two_gflops = two_rate * roofline["train"]["lorasum_gflop_per_token"]
        result["train_two_processes"] = {
            "tokens_per_s": two_rate,
            "peak_rss_mb_each": med("train-lorasum-x2", "peak_rss_mb"),
            "vs_baseline": two_rate / table["train_tokens_per_s"][0],
            "gflops": two_gflops,
            "fraction_of_peak": two_gflops / peak["linear_gflops"],
        }
        ddp_rate = med("train-lorasum-ddp", "tokens_per_s")
        ddp_gflops = ddp_rate * roofline["train"]["lorasum_gflop_per_token"]
        result["train_torchrun_2"] = {
            "tokens_per_s": ddp_rate,
            "peak_rss_mb_rank0": med("train-lorasum-ddp", "peak_rss_mb"),
            "vs_baseline": ddp_rate / table["train_tokens_per_s"][0],
            "vs_one_process": ddp_rate / table["train_tokens_per_s"][1],
            "gflops": ddp_gflops,
            "fraction_of_peak": ddp_gflops / peak["linear_gflops"],
        }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"CPU: {result['cpu']} ({result['cores']} cores), torch {result['torch']}")
    if gpu:
        print(f"GPU: {result['device']} (every side ran there)")
    print(f"{'measure':<40}{'baseline':>12}{'lorasum':>12}{'ratio':>8}")
    for k, (b, s) in table.items():
        ratio = b / s if k == "train_s_per_step" else s / b
        print(f"{k:<40}{b:>12.2f}{s:>12.2f}{ratio:>8.2f}")
    if bf16_baseline:
        v = result["train_vs_baseline_bf16"]
        print(
            f"{'train_tokens_per_s vs Trainer bf16=True':<40}{v['baseline_bf16_tokens_per_s']:>12.2f}"
            f"{v['lorasum_tokens_per_s']:>12.2f}{v['speedup']:>8.2f}"
        )
    if gpu:
        print(
            f"\nmatmul peak at the model's shapes on the GPU: {peak['linear_gflops']:.1f} GFLOP/s "
            f"fp32, {peak['linear_gflops_bf16']:.1f} GFLOP/s bf16 (shares below: of fp32)"
        )
    else:
        two, ddp = result["train_two_processes"], result["train_torchrun_2"]
        print(
            f"{'train_tokens_per_s, 2 lorasum processes':<40}{'':>12}{two['tokens_per_s']:>12.2f}"
            f"{two['vs_baseline']:>8.2f}"
        )
        print(
            f"{'train_tokens_per_s, torchrun 2 x 1 thread':<40}{'':>12}{ddp['tokens_per_s']:>12.2f}"
            f"{ddp['vs_baseline']:>8.2f}   ({ddp['vs_one_process']:.2f}x one 2-thread process)"
        )
        print(
            f"\nmatmul peak at the model's shapes: {peak['linear_gflops']:.1f} GFLOP/s "
            f"({peak['threads']} threads; best of {len(readings)} readings over the run, "
            f"{min(roofline['linear_gflops_peak_readings']):.1f} the lowest), "
            f"{peak_1['linear_gflops']:.1f} GFLOP/s (1 thread)"
            + (
                f"; bf16 {peak['linear_gflops_bf16']:.1f} GFLOP/s"
                if "linear_gflops_bf16" in peak
                else ""
            )
        )
    print(f"{'linear-layer FLOPs':<40}{'baseline':>12}{'lorasum':>12}{'ratio':>8}")
    for kind in ("train", "eval"):
        r = roofline[kind]
        print(
            f"{kind + ': GFLOP per real token':<40}{r['baseline_gflop_per_token']:>12.3f}"
            f"{r['lorasum_gflop_per_token']:>12.3f}{r['flop_ratio']:>8.2f}"
        )
        print(
            f"{kind + ': % of matmul peak':<40}{100 * r['baseline_fraction_of_peak']:>12.1f}"
            f"{100 * r['lorasum_fraction_of_peak']:>12.1f}"
            f"   (of the {r['baseline_peak_precision']} / {r['lorasum_peak_precision']} peak)"
        )
        if "lorasum_fraction_of_adjacent_peak" in r:
            print(
                f"{kind + ': % of the reading before it':<40}"
                f"{100 * r['baseline_fraction_of_adjacent_peak']:>12.1f}"
                f"{100 * r['lorasum_fraction_of_adjacent_peak']:>12.1f}"
                "   (median over repeats)"
            )
    if not gpu:
        two = result["train_two_processes"]
        print(
            f"{'train: % of peak, 2 lorasum processes':<40}{'':>12}"
            f"{100 * two['fraction_of_peak']:>12.1f}"
            "   (1 thread each, as reproduce's workers; together, of the same peak)"
        )
        print(
            f"{'train: % of peak, torchrun 2 x 1 thread':<40}{'':>12}"
            f"{100 * result['train_torchrun_2']['fraction_of_peak']:>12.1f}"
            "   (one training on two processes, of the same peak)"
        )
    print(
        f"speedup (real tokens/s): train {result['speedup']['train']:.2f}x, "
        f"eval {result['speedup']['eval']:.2f}x; at equal FLOP/s the FLOP counts alone would give "
        f"train {roofline['train']['flop_ratio']:.2f}x, eval {roofline['eval']['flop_ratio']:.2f}x"
        f"   -> {out}"
    )


if __name__ == "__main__":
    main()
