"""Adapter-free predictors: the factored mean gradients equal the dense ``W.grad`` of the
answer-only loss (llama Linear and GPT-2 Conv1D), module groups and the cache change nothing,
and the combination-level values follow their definitions."""

import math

import pytest
import torch
from conftest import load_tiny

from lorasum.analysis.gradients import (
    domain_gradients,
    gradient_cosines,
    module_groups,
    target_module_names,
)
from lorasum.data import load_split, make_batches
from lorasum.data.token_cache import tokenize_cached
from lorasum.errors import LorasumError
from lorasum.evaluate import token_nll
from lorasum.models import load_tokenizer

DOMAINS = ("arith", "colors", "finance")
MAX_LENGTH = 48


@pytest.fixture(scope="module")
def sources(qa_files):
    return {d: load_split(str(qa_files[d]), 42, max_train=20) for d in DOMAINS}


def dense_gradient(model_dir, source, modules):
    """The oracle: requires_grad on the targeted base weights, loss.backward() over the rows
    (other batch size than the factored pass: padding must not matter), .grad / tokens in
    nn.Linear orientation; and the mean NLL."""
    from transformers.pytorch_utils import Conv1D

    model, tok = load_tiny(model_dir), load_tokenizer(str(model_dir))
    for p in model.parameters():
        p.requires_grad_(False)
    weights = {m: model.get_submodule(m).weight for m in modules}
    for w in weights.values():
        w.requires_grad_(True)
    items = tokenize_cached(tok, [source], "train", MAX_LENGTH)
    tokens, nll = 0, 0.0
    for batch in make_batches(items, 7, tok.pad_token_id, shuffle=False):
        per_row, counts = token_nll(model, batch)
        per_row.sum().backward()
        tokens += int(counts.sum())
        nll += float(per_row.sum().detach())
    out = {}
    for m, w in weights.items():
        g = w.grad.double() / tokens
        out[m] = g.T if isinstance(model.get_submodule(m), Conv1D) else g  # (d_out, d_in)
    return out, nll / tokens


def cosine(a, b):
    return float((a * b).sum() / (a.norm() * b.norm()))


def test_factored_gradient_cosine_equals_dense(tiny_model, sources, tmp_path):
    model, tok = load_tiny(tiny_model), load_tokenizer(str(tiny_model))
    shapes = target_module_names(model, "auto")
    assert len(shapes) >= 4
    kw = {"model_spec": str(tiny_model), "batch_size": 16}
    one = {
        d: domain_gradients(model, tok, sources[d], MAX_LENGTH, shapes, cache=False, **kw)
        for d in DOMAINS
    }
    # a budget that fits two modules at most: several groups, one pass each; cached on disk
    budget = 2 * max(4 * a * b for a, b in shapes.values())
    assert len(module_groups(shapes, budget)) > 1
    kw.update(max_bytes=budget, cache_dir=tmp_path)
    grouped = {
        d: domain_gradients(model, tok, sources[d], MAX_LENGTH, shapes, **kw) for d in DOMAINS
    }
    assert all(g.computed and len({*g.files.values()}) > 1 for g in grouped.values())
    dense = {d: dense_gradient(tiny_model, sources[d], list(shapes)) for d in DOMAINS}
    for d in DOMAINS:
        assert one[d].loss == pytest.approx(dense[d][1], rel=1e-6)
        for m in shapes:
            g = one[d].gradient(m).double()
            assert torch.allclose(g, dense[d][0][m], rtol=1e-4, atol=1e-7 * g.abs().max())
            assert torch.equal(grouped[d].gradient(m), one[d].gradient(m))  # groups: same sums
    result = gradient_cosines(one)
    assert gradient_cosines(grouped)["modules"] == result["modules"]
    names = result["names"]
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            cos = [cosine(dense[a][0][m], dense[b][0][m]) for m in shapes]
            for k, m in enumerate(shapes):
                assert result["modules"][m][i][j] == pytest.approx(cos[k], abs=1e-5)
            assert result["rms"][i][j] == pytest.approx(
                math.sqrt(sum(c * c for c in cos) / len(cos)), abs=1e-5
            )
            assert result["mean"][i][j] == pytest.approx(sum(cos) / len(cos), abs=1e-5)
            num = sum(float((dense[a][0][m] * dense[b][0][m]).sum()) for m in shapes)
            na = sum(float(dense[a][0][m].square().sum()) for m in shapes)
            nb = sum(float(dense[b][0][m].square().sum()) for m in shapes)
            assert result["global"][i][j] == pytest.approx(num / math.sqrt(na * nb), abs=1e-5)
    assert result["rms"][0][0] == pytest.approx(1.0)
    assert abs(result["mean"][0][1]) < 0.999  # distinct domains: not trivially parallel


def test_cache_is_reused_and_keyed(tiny_llama, sources, qa_files, tmp_path):
    model, tok = load_tiny(tiny_llama), load_tokenizer(str(tiny_llama))
    shapes = target_module_names(model, ["q_proj", "down_proj"])
    assert all(m.endswith(("q_proj", "down_proj")) for m in shapes)
    kw = {"model_spec": "tiny", "cache_dir": tmp_path}
    first = domain_gradients(model, tok, sources["arith"], MAX_LENGTH, shapes, **kw)
    again = domain_gradients(model, tok, sources["arith"], MAX_LENGTH, shapes, **kw)
    assert first.computed and not again.computed and again.key == first.key
    for m in shapes:
        assert torch.equal(again.gradient(m), first.gradient(m))
    assert again.loss == first.loss and again.tokens == first.tokens
    other_rows = load_split(str(qa_files["arith"]), 42, max_train=10)
    other = domain_gradients(model, tok, other_rows, MAX_LENGTH, shapes, **kw)
    assert other.computed and other.key != first.key
    shorter = domain_gradients(model, tok, sources["arith"], 32, shapes, **kw)
    assert shorter.key not in (first.key, other.key)


def test_module_groups_fit_the_budget():
    shapes = {"a": (4, 4), "b": (4, 4), "c": (8, 8), "d": (2, 2)}
    assert module_groups(shapes, 4 * 32) == [["a", "b"], ["c"], ["d"]]
    assert module_groups(shapes, 1) == [["a"], ["b"], ["c"], ["d"]]
    assert module_groups(shapes, 10**9) == [["a", "b", "c", "d"]]
    with pytest.raises(LorasumError):
        target_module_names(torch.nn.Linear(2, 2), ["nope"])
