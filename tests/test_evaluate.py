"""Answer-only perplexity: hand-checked values, batch/padding invariance, the fast logits path."""

from __future__ import annotations

import math

import pytest
import torch

from lorasum import evaluate as evaluate_mod
from lorasum.data import QA, load_split, make_batches, tokenize_qa, tokenize_split
from lorasum.evaluate import (
    PLAIN_HEAD_TYPES,
    counted_logits,
    evaluate,
    evaluate_batches,
    token_nll,
)
from lorasum.models import load_model, load_tokenizer

CPU = torch.device("cpu")

QAS = [
    QA("What is 3 plus 4?", "7"),
    QA("Which colour is item 12?", "Item 12 is purple."),
    QA("Should I hold gold for 9 years?", "Hold gold 41%."),
]


@pytest.fixture
def model_and_tok(tiny_model):
    return load_model(str(tiny_model), CPU), load_tokenizer(str(tiny_model))


def _hand_nll(model, items) -> tuple[float, int]:
    """Σ −log p(target) over counted targets, one unpadded sequence at a time."""
    total, count = 0.0, 0
    with torch.no_grad():
        for t, _ in items:
            ids = torch.tensor([t.input_ids])
            logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)  # (T, V)
            for pos in range(1, len(t.input_ids)):
                if t.counted[pos]:
                    total -= float(logp[pos - 1, t.input_ids[pos]])
                    count += 1
    return total, count


@pytest.mark.parametrize("answer_only", [True, False])
def test_perplexity_matches_hand_computation(model_and_tok, answer_only):
    model, tok = model_and_tok
    items = [(tokenize_qa(tok, qa, 64, answer_only), 0) for qa in QAS]
    nll, count = _hand_nll(model, items)
    assert count == sum(sum(t.counted) for t, _ in items)

    batches = make_batches(items, 3, tok.pad_token_id, shuffle=False)
    assert len(batches) == 1 and batches[0].input_ids.shape[0] == 3  # padding in play
    res = evaluate_batches(model, batches, ["qa"], CPU)
    assert res["tokens"] == count
    assert res["nll"] == pytest.approx(nll, rel=1e-5)
    assert res["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    # A random tiny model is near-uniform over its vocabulary, not degenerate.
    assert 1.0 < res["perplexity"] < 10 * len(tok)


def test_answer_only_differs_from_full_sequence(model_and_tok):
    model, tok = model_and_tok
    res = {}
    for answer_only in (True, False):
        items = [(tokenize_qa(tok, qa, 64, answer_only), 0) for qa in QAS]
        res[answer_only] = evaluate_batches(
            model, make_batches(items, 2, tok.pad_token_id, False), ["qa"], CPU
        )
    assert res[True]["tokens"] < res[False]["tokens"]
    assert res[True]["nll"] != pytest.approx(res[False]["nll"], rel=1e-3)


def _sources_items(tok, qa_files, answer_only=True):
    sources = [load_split(str(qa_files[n]), seed=42) for n in ("arith", "colors", "finance")]
    return sources, tokenize_split(tok, sources, "train", 40, answer_only)


def test_invariant_to_batch_size_and_padding(model_and_tok, qa_files):
    model, tok = model_and_tok
    sources, items = _sources_items(tok, qa_files)
    items = items[::4]  # ~36 items across all three sources: quick, still mixed
    names = [s.name for s in sources]
    results = [
        evaluate_batches(model, make_batches(items, bs, pad, shuffle=shuffle), names, CPU)
        for bs, pad, shuffle in [
            (1, tok.pad_token_id, False),  # no padding at all
            (3, tok.pad_token_id, False),
            (16, tok.pad_token_id, False),
            (16, 7, False),  # another pad id
            (5, tok.pad_token_id, True),  # training order: mixed lengths per batch
            (len(items), 11, False),  # one batch, maximal padding
        ]
    ]
    ref = results[0]
    assert ref["tokens"] == sum(sum(t.counted) for t, _ in items)
    for r in results[1:]:
        assert r["tokens"] == ref["tokens"]
        assert r["perplexity"] == pytest.approx(ref["perplexity"], rel=1e-5)
        for name in names:
            assert r["per_dataset"][name]["tokens"] == ref["per_dataset"][name]["tokens"]
            assert r["per_dataset"][name]["nll"] == pytest.approx(
                ref["per_dataset"][name]["nll"], rel=1e-5
            )
    for r in results:
        per = r["per_dataset"]
        assert list(per) == names
        assert sum(p["tokens"] for p in per.values()) == r["tokens"]
        assert sum(p["nll"] for p in per.values()) == pytest.approx(r["nll"], rel=1e-9)
        assert all(p["tokens"] > 0 for p in per.values())
        for p in per.values():
            assert p["perplexity"] == pytest.approx(math.exp(p["nll"] / p["tokens"]), rel=1e-9)


def test_per_dataset_equals_evaluating_that_source_alone(model_and_tok, qa_files):
    model, tok = model_and_tok
    sources, items = _sources_items(tok, qa_files)
    names = [s.name for s in sources]
    mixed = evaluate_batches(model, make_batches(items, 8, tok.pad_token_id, False), names, CPU)
    alone_items = [(t, 0) for t, d in items if d == 1]
    alone = evaluate_batches(
        model, make_batches(alone_items, 8, tok.pad_token_id, False), ["colors"], CPU
    )
    assert mixed["per_dataset"][names[1]]["tokens"] == alone["tokens"]
    assert mixed["per_dataset"][names[1]]["perplexity"] == pytest.approx(
        alone["perplexity"], rel=1e-5
    )


def test_evaluate_batches_restores_training_mode(model_and_tok):
    model, tok = model_and_tok
    items = [(tokenize_qa(tok, qa, 64), 0) for qa in QAS]
    batches = make_batches(items, 2, tok.pad_token_id, False)
    model.train()
    evaluate_batches(model, batches, ["qa"], CPU)
    assert model.training
    model.eval()
    evaluate_batches(model, batches, ["qa"], CPU)
    assert not model.training


def test_no_counted_tokens_gives_nan():
    assert math.isnan(evaluate_mod.perplexity_from(0.0, 0))


# ---------------------------------------------------------------------------------------------
# counted_logits: the fast path (head on counted positions only) equals the model's own logits


def _slow_logits(model, batch):
    mask = batch.counted[:, 1:]
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    return out.logits[:, :-1][mask].float(), batch.input_ids[:, 1:][mask]


def _batch(tok, answer_only=True):
    items = [(tokenize_qa(tok, qa, 64, answer_only), 0) for qa in QAS]
    return make_batches(items, 3, tok.pad_token_id, shuffle=False)[0]


@pytest.mark.parametrize("answer_only", [True, False])
def test_fast_path_equals_model_logits(model_and_tok, answer_only):
    model, tok = model_and_tok
    model.eval()
    assert model.config.model_type in PLAIN_HEAD_TYPES  # the fast path is what we test
    batch = _batch(tok, answer_only)
    with torch.no_grad():
        fast, fast_targets = counted_logits(model, batch)
        slow, slow_targets = _slow_logits(model, batch)
    n = int(batch.counted[:, 1:].sum())
    assert fast.shape == (n, len(tok)) and fast.dtype == torch.float32
    assert torch.equal(fast_targets, slow_targets)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)


def test_slow_path_equals_fast_path(model_and_tok, monkeypatch):
    model, tok = model_and_tok
    model.eval()
    batch = _batch(tok)
    with torch.no_grad():
        fast = counted_logits(model, batch)
        fast_nll = token_nll(model, batch)
        monkeypatch.setattr(evaluate_mod, "PLAIN_HEAD_TYPES", frozenset())
        slow = counted_logits(model, batch)
        slow_nll = token_nll(model, batch)
    torch.testing.assert_close(fast[0], slow[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(fast[1], slow[1])
    torch.testing.assert_close(fast_nll[0], slow_nll[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(fast_nll[1], slow_nll[1])
    assert fast_nll[1].tolist() == batch.counted.sum(1).tolist()  # counted[:, 0] is never set


def test_fast_path_keeps_lora_active(model_and_tok):
    """Through a PeftModel the fast path must still see the injected LoRA layers."""
    from peft import LoraConfig, get_peft_model

    from lorasum.models import auto_target_modules

    model, tok = model_and_tok
    batch = _batch(tok)
    with torch.no_grad():
        base, _ = counted_logits(model, batch)
    torch.manual_seed(0)
    peft_model = get_peft_model(
        model,
        LoraConfig(
            r=4,
            lora_alpha=16,
            target_modules=auto_target_modules(model),
            init_lora_weights=False,  # random B: the adapter changes the output
            fan_in_fan_out=model.config.model_type == "gpt2",
        ),
    )
    peft_model.eval()
    with torch.no_grad():
        fast, _ = counted_logits(peft_model, batch)
        slow, _ = _slow_logits(peft_model, batch)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    assert (fast - base).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------
# The library function


def test_evaluate_library_function(tiny_llama, qa_files):
    src = str(qa_files["arith"])
    res = evaluate(
        model=str(tiny_llama),
        data=[src],
        max_length=32,
        batch_size=4,
        precision="fp32",
        device="cpu",
        progress=False,
    )
    for key in ("perplexity", "nll", "tokens", "per_dataset", "split", "answer_only"):
        assert key in res
    assert res["split"] == "test" and res["answer_only"] is True and res["adapter"] is None
    assert list(res["per_dataset"]) == [src]
    assert res["per_dataset"][src]["tokens"] == res["tokens"] > 0
    assert math.isfinite(res["perplexity"]) and res["perplexity"] > 1

    # Same number by hand: load, split, tokenise, batch, evaluate.
    tok = load_tokenizer(str(tiny_llama))
    model = load_model(str(tiny_llama), CPU)
    items = tokenize_split(tok, [load_split(src, 42)], "test", 32)
    manual = evaluate_batches(model, make_batches(items, 7, tok.pad_token_id, False), [src], CPU)
    assert res["tokens"] == manual["tokens"]
    assert res["perplexity"] == pytest.approx(manual["perplexity"], rel=1e-5)


def test_evaluate_rejects_bad_arguments(tiny_llama, qa_files):
    from lorasum.errors import LorasumError

    src = str(qa_files["arith"])
    with pytest.raises(LorasumError, match="no data"):
        evaluate(model=str(tiny_llama), data=[], progress=False)
    with pytest.raises(LorasumError, match="--split"):
        evaluate(model=str(tiny_llama), data=[src], split="dev", progress=False)
    with pytest.raises(LorasumError, match="--max-length"):
        evaluate(model=str(tiny_llama), data=[src], max_length=4, progress=False)


def test_chunked_vocabulary_projection_gives_the_same_nll(tiny_llama, qa_files, monkeypatch):
    """Evaluation projects the counted positions onto the vocabulary HEAD_CHUNK at a time (no
    N × V logits at once): per-row NLL equal to the whole projection's, to float rounding."""
    import torch

    from lorasum.data import load_split, make_batches, tokenize_split
    from lorasum.models import load_model, load_tokenizer

    model, tok = load_model(str(tiny_llama)), load_tokenizer(str(tiny_llama))
    sources = [load_split(str(p), 42) for p in qa_files.values()]
    for answer_only in (True, False):
        items = tokenize_split(tok, sources, "test", 32, answer_only)
        batch = make_batches(items, 8, tok.pad_token_id, False)[0]
        with torch.no_grad():
            whole = evaluate_mod.token_nll(model, batch)
            monkeypatch.setattr(evaluate_mod, "HEAD_CHUNK", 3)  # many chunks, a ragged last one
            chunked = evaluate_mod.token_nll(model, batch)
            monkeypatch.undo()
        with torch.enable_grad():  # training keeps the one projection (its backward needs it)
            grad_path = evaluate_mod.token_nll(model, batch)
        assert torch.equal(whole[1], chunked[1]) and int(whole[1].sum()) > 3
        torch.testing.assert_close(chunked[0], whole[0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grad_path[0].detach(), whole[0], rtol=1e-6, atol=1e-6)


def test_chunked_projection_in_one_buffer_is_cross_entropy_bitwise(
    tiny_llama, qa_files, monkeypatch
):
    """A plain fp32 head projects every chunk into one reused buffer with the log-softmax in
    place; the same per-row NLL, bitwise, as `F.cross_entropy` over each chunk's own logits (the
    path a head with a hook takes, since the buffer path never calls the module)."""
    import torch

    from lorasum.data import load_split, make_batches, tokenize_split
    from lorasum.models import load_model, load_tokenizer
    from lorasum.training.low_memory import fused_head

    model, tok = load_model(str(tiny_llama)), load_tokenizer(str(tiny_llama))
    sources = [load_split(str(p), 42) for p in qa_files.values()]
    items = tokenize_split(tok, sources, "test", 32, False)
    batch = make_batches(items, 8, tok.pad_token_id, False)[0]
    head = model.get_output_embeddings()
    calls = []
    monkeypatch.setattr(evaluate_mod, "HEAD_CHUNK", 5)  # the buffer reused, a ragged last chunk
    with torch.no_grad():
        assert fused_head(head, torch.zeros(1, head.in_features))
        buffered = evaluate_mod.token_nll(model, batch)
        hook = head.register_forward_hook(lambda *a: calls.append(1))
        assert not fused_head(head, torch.zeros(1, head.in_features))
        per_chunk = evaluate_mod.token_nll(model, batch)
        hook.remove()
    assert calls and int(batch.counted[:, 1:].sum()) % 5 and int(batch.counted.sum()) > 10
    assert torch.equal(buffered[0], per_chunk[0]) and torch.equal(buffered[1], per_chunk[1])
