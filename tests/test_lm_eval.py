"""`lorasum eval --metric accuracy` against lm-evaluation-harness itself (`make lm-eval-check`):
on a tiny random Llama with a LoRA adapter, lm-eval's ``hf`` model (through
``benchmarks/lm_eval_check.py``) and lorasum pick the same option for every question, report the
same acc / acc_norm, and score every option's log-likelihood alike. Skipped where lm_eval is not
installed (it is no dependency of lorasum or of `make test`)."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import torch
from conftest import load_tiny, make_adapter, write_jsonl

pytest.importorskip(
    "lm_eval", reason="lm_eval is not installed (`make lm-eval-check` installs lm_eval==0.4.13)"
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import lm_eval_check  # noqa: E402

from lorasum.evaluate import option_logliks  # noqa: E402
from lorasum.models import load_tokenizer  # noqa: E402

ROWS = 12


def mc_rows(n: int, seed: int = 0) -> list[dict]:
    """Multiple-choice rows whose options differ in length (so acc_norm is not acc), the correct
    one at a random place, some options with digits and punctuation."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        colour = rng.choice(["red", "green", "blue", "yellow", "purple"])
        options = [
            str(a + b),
            str(a + b + rng.randint(1, 9)),
            f"Item {a} is {colour}.",
            f"Hold bonds for {b} years, then {a}%",
        ]
        rng.shuffle(options)
        rows.append(
            {
                "question": f"What is {a} plus {b}? (case {i})",
                "choices": options,
                "label": options.index(str(a + b)),
            }
        )
    return rows


@pytest.fixture(scope="module")
def checked(tiny_llama, tmp_path_factory):
    d = tmp_path_factory.mktemp("lm-eval")
    data = write_jsonl(d / "mc.jsonl", mc_rows(40))
    adapter = make_adapter(tiny_llama, d / "adapter", seed=3)
    result = lm_eval_check.check(
        str(tiny_llama),
        [str(data)],
        str(adapter),
        rows=ROWS,
        split="train",
        batch_size=4,
        max_length=128,
    )
    return result, result["sources"][str(data)], tiny_llama, data


def test_same_choices_and_accuracy(checked):
    result, r, _, _ = checked
    assert r["rows"] == ROWS
    assert r["requests_equal"] == ROWS  # lm-eval scored "Question: {q}\nAnswer:" + " option"
    assert r["lm_eval_self_consistent"] == ROWS
    assert r["equal_acc_choice"] == ROWS and r["equal_acc_norm_choice"] == ROWS, r["differing"]
    assert r["lorasum_acc"] == pytest.approx(r["lm_eval_acc"], abs=1e-12)
    assert r["lorasum_acc_norm"] == pytest.approx(r["lm_eval_acc_norm"], abs=1e-12)
    assert result["agree"]


def test_same_logliks_and_tokens(checked):
    _, r, _, _ = checked
    assert r["max_abs_loglik_diff"] < 1e-4
    theirs, ours = torch.tensor(r["lm_eval_logliks"]), torch.tensor(r["lorasum_logliks"])
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    assert r["tokens"]["continuation_tokens_differ"] == 0
    assert r["tokens"]["context_tokens_differ"] == 0


def test_rows_not_vacuous(checked):
    """Some question's per-character pick differs from its raw pick, so the agreement on
    acc_norm is not acc's twice."""
    _, r, _, data = checked
    rows = lm_eval_check.select_rows(str(data), "train", ROWS)
    raw = [max(range(len(ll)), key=ll.__getitem__) for ll in r["lm_eval_logliks"]]
    norm = [
        max(range(len(ll)), key=lambda k, ll=ll, qa=qa: ll[k] / len(qa.choices[k]))
        for ll, qa in zip(r["lm_eval_logliks"], rows, strict=True)
    ]
    assert raw != norm


def test_adapter_applied_on_both_sides(checked):
    """lm-eval's ``peft=`` really changed the scores: the base model alone scores otherwise
    (so the agreement above is the adapter's, not the base's twice)."""
    _, r, model_dir, data = checked
    rows = lm_eval_check.select_rows(str(data), "train", ROWS)
    base = option_logliks(
        load_tiny(model_dir), load_tokenizer(str(model_dir)), rows, 128, 4, torch.device("cpu")
    )
    shift = (torch.tensor(base) - torch.tensor(r["lm_eval_logliks"])).abs().max()
    assert shift > 1e-2
