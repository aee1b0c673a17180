"""Check `lorasum eval --metric accuracy` against EleutherAI's lm-evaluation-harness itself
(`make lm-eval-check`; needs ``pip install lm_eval==0.4.13``, which lorasum does not depend on).

    .venv/bin/python benchmarks/lm_eval_check.py --model default --data medicine,science \\
        [--adapter DIR] [--rows 32] [--split test] [--json benchmarks/results/lm_eval_check.json]

For each data source (a builtin domain or a .jsonl/.csv with a ``choices`` field), the first
``--rows`` multiple-choice rows of the split (lorasum's seeded 80/10/10 split) are written as a
local lm-eval task in a temporary directory: ``output_type: multiple_choice``, ``doc_to_text:
"Question: {{question}}\\nAnswer:"``, ``doc_to_choice: choices``, ``doc_to_target: label``,
``target_delimiter: " "``, metrics acc and acc_norm. lm-eval scores them through its own API
(``lm_eval.simple_evaluate`` with the ``hf`` model built from ``pretrained=``, ``peft=``,
``dtype=float32`` on the CPU, ``log_samples=True``); lorasum scores the same rows with the same
model and adapter through its own functions (`lorasum.evaluate.option_logliks` + `pick` per
question, `accuracy_of` for acc / acc_norm), in fp32.

Compared per source: the option each side picks per question (acc: highest log-likelihood;
acc_norm: per character), acc and acc_norm, every option's log-likelihood (lm-eval's logged
``filtered_resps``), the context/continuation strings lm-eval built, and the continuation
tokens: lm-eval's ``_encode_pair`` (context + continuation encoded together, then split) vs the
tokens lorasum counts (context and ``" " + option`` encoded apart). Prints a table, writes JSON,
and exits 1 when any question's acc or acc_norm choice differs.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from lorasum.accuracy import pick, tokenize_choice
from lorasum.data import QA, Source, load_split, prompt_text

LM_EVAL_VERSION = "0.4.13"


def select_rows(
    data: str, split: str, rows: int, split_seed: int = 42, choices_field: str | None = None
) -> list[QA]:
    """The first ``rows`` multiple-choice rows of ``data``'s split, as `lorasum eval` splits it."""
    source = load_split(data, split_seed, choices_field=choices_field)
    picked = [qa for qa in source.splits[split] if qa.choices is not None][:rows]
    if not picked:
        raise ValueError(f"{data}: no row of the {split} split has options (a choices field)")
    return picked


def task_name(data: str) -> str:
    return "lorasum_check_" + re.sub(r"[^A-Za-z0-9]+", "_", Path(data).stem).strip("_").lower()


def write_task(rows: Sequence[QA], task_dir: Path, name: str) -> Path:
    """The rows as a local jsonl and an lm-eval multiple-choice task YAML reading it."""
    import yaml

    docs = task_dir / f"{name}.jsonl"
    docs.write_text(
        "".join(
            json.dumps({"question": qa.question, "choices": list(qa.choices), "label": qa.label})
            + "\n"
            for qa in rows
        )
    )
    task = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {
            "data_files": {"test": str(docs)},
            "cache_dir": str(task_dir / "hf-datasets"),
        },
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_choice": "choices",
        "doc_to_target": "label",
        "target_delimiter": " ",
        "metric_list": [
            {"metric": m, "aggregation": "mean", "higher_is_better": True}
            for m in ("acc", "acc_norm")
        ],
        "metadata": {"version": 1.0},
    }
    path = task_dir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(task, sort_keys=False, allow_unicode=True))
    return path


def lm_eval_model(model_dir: str, adapter: str | None, batch_size: int, max_length: int):
    """lm-eval's ``hf`` model, built exactly as ``simple_evaluate(model="hf", model_args=...)``
    builds it (`create_from_arg_obj`); kept so its tokenizer's ``_encode_pair`` can be asked too."""
    import lm_eval.api.registry

    args = {"pretrained": model_dir, "dtype": "float32", "max_length": max_length}
    if adapter:
        args["peft"] = adapter
    lm = lm_eval.api.registry.get_model("hf").create_from_arg_obj(
        args, {"batch_size": batch_size, "device": "cpu"}
    )
    return lm, args


def run_lm_eval(lm, tasks: dict[str, list[QA]], task_dir: Path, batch_size: int) -> dict:
    """lm-eval's scores per task: acc, acc_norm and, per question, every option's
    log-likelihood, lm-eval's own per-question acc / acc_norm and the (context, continuation)
    strings it scored, in row order."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(tasks),
        num_fewshot=0,
        batch_size=batch_size,
        device="cpu",
        log_samples=True,
        task_manager=manager,
        bootstrap_iters=0,
    )
    result = {}
    for name, rows in tasks.items():
        samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
        if len(samples) != len(rows):
            raise RuntimeError(
                f"{name}: lm-eval logged {len(samples)} samples for {len(rows)} rows"
            )
        result[name] = {
            "acc": out["results"][name]["acc,none"],
            "acc_norm": out["results"][name]["acc_norm,none"],
            "logliks": [[float(r[0]) for r in s["filtered_resps"]] for s in samples],
            "correct": [bool(s["acc"]) for s in samples],
            "correct_norm": [bool(s["acc_norm"]) for s in samples],
            "requests": [[tuple(a) for a in s["arguments"]] for s in samples],
        }
    return result


def lorasum_model(model: str, adapter: str | None):
    """Model and tokenizer as `lorasum.evaluate.evaluate` loads them (fp32 weights)."""
    from lorasum.adapters import check_fits, read_adapter
    from lorasum.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(model)
    net = load_model(model, torch.device("cpu"))
    if adapter:
        from peft import PeftModel

        check_fits(read_adapter(adapter), net, model)
        net = PeftModel.from_pretrained(net, adapter)
    return net.eval(), tokenizer


def run_lorasum(net, tokenizer, rows: list[QA], batch_size: int, max_length: int) -> dict:
    """lorasum's scores, in fp32 (no autocast): every option's log-likelihood and the picks per
    question (`option_logliks`, `pick`), acc / acc_norm as `lorasum eval` reports them."""
    from lorasum.evaluate import accuracy_of, option_logliks

    cpu = torch.device("cpu")
    logliks = option_logliks(net, tokenizer, rows, max_length, batch_size, cpu, None)
    picks = [pick(ll, [len(c) for c in qa.choices]) for qa, ll in zip(rows, logliks, strict=True)]
    source = Source("check", "lm_eval_check", {"test": rows})
    summary = accuracy_of(net, tokenizer, [source], "test", cpu, None, max_length, batch_size)
    return {
        "acc": summary["acc"],
        "acc_norm": summary["acc_norm"],
        "logliks": logliks,
        "picks": picks,
    }


def token_agreement(lm, tokenizer, rows: list[QA], max_length: int) -> dict:
    """Options whose continuation (or context) tokens differ between lm-eval's ``_encode_pair``
    (context + continuation encoded together, then split at the context's length) and lorasum's
    `tokenize_choice` (the context and ``" " + option`` encoded apart); the longest sequence."""
    continuation_differs = context_differs = options = longest = 0
    examples = []
    for qa in rows:
        for option in qa.choices:
            options += 1
            context, continuation = lm._encode_pair(prompt_text(qa.question), " " + option)
            ours = tokenize_choice(tokenizer, qa.question, option, max_length)
            counted = [t for t, c in zip(ours.input_ids, ours.counted, strict=True) if c]
            uncounted = [t for t, c in zip(ours.input_ids, ours.counted, strict=True) if not c]
            longest = max(longest, len(context) + len(continuation))
            context_differs += uncounted != list(context)
            if counted != list(continuation):
                continuation_differs += 1
                if len(examples) < 5:
                    examples.append(
                        {"option": option, "lm_eval": list(continuation), "lorasum": counted}
                    )
    return {
        "options": options,
        "continuation_tokens_differ": continuation_differs,
        "context_tokens_differ": context_differs,
        "longest_tokens": longest,
        "examples": examples,
    }


def compare(rows: list[QA], lm: dict, ours: dict) -> dict:
    """Per question: lm-eval's picks (``np.argmax`` of its logged log-likelihoods, raw and per
    character, as its ``process_results``) against lorasum's; the largest |Δ log-likelihood|."""
    import numpy as np

    equal = equal_norm = consistent = 0
    max_diff = 0.0
    differing = []
    contexts_equal = 0
    for i, qa in enumerate(rows):
        ll = np.array(lm["logliks"][i])
        lens = np.array([float(len(c)) for c in qa.choices])
        theirs = (int(np.argmax(ll)), int(np.argmax(ll / lens)))
        mine = ours["picks"][i]
        equal += theirs[0] == mine[0]
        equal_norm += theirs[1] == mine[1]
        # lm-eval's own per-question acc agrees with the pick read back from its log-likelihoods
        consistent += (theirs[0] == qa.label) == lm["correct"][i] and (theirs[1] == qa.label) == lm[
            "correct_norm"
        ][i]
        diff = float(np.max(np.abs(ll - np.array(ours["logliks"][i]))))
        max_diff = max(max_diff, diff)
        if theirs != tuple(mine):
            top = np.sort(ll)[::-1]
            differing.append(
                {"row": i, "lm_eval": theirs, "lorasum": mine, "lm_eval_margin": top[0] - top[1]}
            )
        wanted = [(prompt_text(qa.question), " " + c) for c in qa.choices]
        contexts_equal += lm["requests"][i] == wanted
    return {
        "rows": len(rows),
        "options": sum(len(qa.choices) for qa in rows),
        "equal_acc_choice": equal,
        "equal_acc_norm_choice": equal_norm,
        "lm_eval_acc": lm["acc"],
        "lm_eval_acc_norm": lm["acc_norm"],
        "lorasum_acc": ours["acc"],
        "lorasum_acc_norm": ours["acc_norm"],
        "max_abs_loglik_diff": max_diff,
        "max_abs_loglik": max(abs(x) for row in lm["logliks"] for x in row),
        "requests_equal": contexts_equal,
        "lm_eval_self_consistent": consistent,
        "differing": differing,
        "lm_eval_logliks": lm["logliks"],
        "lorasum_logliks": ours["logliks"],
    }


def agrees(r: dict) -> bool:
    return r["equal_acc_choice"] == r["rows"] == r["equal_acc_norm_choice"]


def check(
    model: str,
    data: Sequence[str],
    adapter: str | None = None,
    rows: int = 32,
    split: str = "test",
    batch_size: int = 8,
    max_length: int = 2048,
    split_seed: int = 42,
    choices_field: str | None = None,
) -> dict:
    """Both sides on each source; the comparison per source (`compare`, `token_agreement`)."""
    from lorasum.models import resolve_model

    selected = {task_name(d): select_rows(d, split, rows, split_seed, choices_field) for d in data}
    if len(selected) != len(data):
        raise ValueError(f"two data sources give the same task name: {', '.join(data)}")
    model_dir = resolve_model(model)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lm-eval-check-") as tmp:
        for name, picked in selected.items():
            write_task(picked, Path(tmp), name)
        lm, model_args = lm_eval_model(model_dir, adapter, batch_size, max_length)
        theirs = run_lm_eval(lm, selected, Path(tmp), batch_size)
    t_lm_eval = time.perf_counter() - t0
    t0 = time.perf_counter()
    net, tokenizer = lorasum_model(model, adapter)
    per_source = {}
    for d, (name, picked) in zip(data, selected.items(), strict=True):
        ours = run_lorasum(net, tokenizer, picked, batch_size, max_length)
        per_source[d] = {
            **compare(picked, theirs[name], ours),
            "tokens": token_agreement(lm, tokenizer, picked, max_length),
        }
    t_lorasum = time.perf_counter() - t0
    import lm_eval
    import transformers

    return {
        "model": model,
        "model_dir": model_dir,
        "adapter": adapter,
        "split": split,
        "split_seed": split_seed,
        "max_length": max_length,
        "batch_size": batch_size,
        "precision": "fp32",
        "device": "cpu",
        "lm_eval_model_args": model_args,
        "versions": {
            "lm_eval": lm_eval.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "machine": {"cpu": _cpu_name(), "threads": torch.get_num_threads()},
        "seconds": {"lm_eval": round(t_lm_eval, 1), "lorasum": round(t_lorasum, 1)},
        "sources": per_source,
        "agree": all(agrees(r) for r in per_source.values()),
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def table(result: dict) -> str:
    head = (
        "| source | rows | equal acc choice | equal acc_norm choice | acc lm-eval / lorasum "
        "| acc_norm lm-eval / lorasum | max abs Δ loglik | continuation tokens differ |"
    )
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for d, r in result["sources"].items():
        t = r["tokens"]
        lines.append(
            f"| {d} | {r['rows']} | {r['equal_acc_choice']}/{r['rows']} "
            f"| {r['equal_acc_norm_choice']}/{r['rows']} "
            f"| {r['lm_eval_acc']:.4f} / {r['lorasum_acc']:.4f} "
            f"| {r['lm_eval_acc_norm']:.4f} / {r['lorasum_acc_norm']:.4f} "
            f"| {r['max_abs_loglik_diff']:.2e} "
            f"| {t['continuation_tokens_differ']}/{t['options']} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default", help="lorasum model (default, HF dir or id)")
    p.add_argument("--data", required=True, help="comma-separated builtin domains or files")
    p.add_argument("--adapter", default=None, help="a PEFT LoRA adapter directory")
    p.add_argument("--rows", type=int, default=32, help="multiple-choice rows per source")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--split-seed", type=int, default=42)
    p.add_argument("--choices-field", default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=2048, help="both sides; no row is cut")
    p.add_argument("--json", type=Path, default=None, help="write the result here")
    args = p.parse_args(argv)
    if args.rows < 1:
        p.error("--rows must be >= 1")
    result = check(
        args.model,
        [d for d in args.data.split(",") if d],
        args.adapter,
        args.rows,
        args.split,
        args.batch_size,
        args.max_length,
        args.split_seed,
        args.choices_field,
    )
    print(table(result))
    for d, r in result["sources"].items():
        for row in r["differing"]:
            print(f"{d}: row {row['row']} picks differ: {row}")
        if r["tokens"]["longest_tokens"] > args.max_length:
            print(f"{d}: a sequence of {r['tokens']['longest_tokens']} tokens was cut")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=float) + "\n")
        print(f"wrote {args.json}")
    print("agree" if result["agree"] else "DISAGREE: some question's choice differs")
    return 0 if result["agree"] else 1


if __name__ == "__main__":
    sys.exit(main())
