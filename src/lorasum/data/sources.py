"""QA sources: the row type (`QA`), a loaded and split source (`Source`), ``.jsonl``/``.csv``
files with question/answer fields (optionally a ``choices`` list, with ``answer`` the correct
option's text or ``label`` its 0-based index) and ``hf:<dataset id>[:split]`` through
``datasets`` where the hub is reachable; and `combo_name`, the name of a combination of sources.

Multiple-choice rows keep their options (``QA.choices``, ``QA.label``) for task accuracy
(`lorasum.accuracy`); options take no part in equality, de-duplication or `Source.fingerprint`,
so the rows, splits and hashes of every source are what they were before options were kept.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lorasum.errors import LorasumError

QUESTION_FIELDS = ("question", "Question", "Problem", "problem", "prompt", "input", "instruction")
ANSWER_FIELDS = ("answer", "Answer", "Rationale", "rationale", "response", "output", "completion")
CHOICES_FIELD = "choices"  # a file's options field unless --choices-field names another
LABEL_FIELD = "label"  # the correct option's 0-based index, where a row gives it instead of text


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


def combo_name(domains: Sequence[str]) -> str:
    """``arith+colors``: a combination of domains, in its order — the one place its name is
    built (directories, results.json keys, the report; `study.names` builds the rest)."""
    return "+".join(domains)


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
