"""Task accuracy beside perplexity, with lm-evaluation-harness conventions: the math (picking
an option, normalising and matching answers, tokenising options, counting); the model passes
that use it are `lorasum.evaluate.option_logliks`, `greedy_answers` and `accuracy_of`.

Multiple-choice rows (``QA.choices``): the context is the perplexity prompt
(`lorasum.data.prompt_text`, ``"Question: {q}\\nAnswer:"``), each option's continuation is
``" " + option`` without an EOS, and its score is the continuation's summed log-likelihood.
``acc`` counts questions whose highest-scoring option is the correct one; ``acc_norm`` ranks by
that log-likelihood divided by the option's length in characters — ``len(option)``, the option
text *without* the leading space, as lm-eval's ``completion_len = [len(c) for c in choices]``.
All options of a question are scored in the same batch, under the precision of perplexity
evaluation (`lorasum.evaluate.inference_context` and `token_nll`).

Free-form rows with a short answer (at most SHORT_ANSWER_WORDS words, or a number first, as in
ASDiv or NQ-open): exact match of a greedy generation (up to ``max_new_tokens``, cut at EOS and
to its first non-empty line) against every accepted answer (``QA.accepted``), after SQuAD's
normalisation (`normalize_answer`); answers that start with a number are compared as numbers
(`answers_match`). Rows with neither options nor a short answer are skipped and counted.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lorasum.data.sources import QA
from lorasum.data.tokenize import Tokenized, prompt_text
from lorasum.errors import LorasumError

METRICS = ("perplexity", "accuracy", "all")
DEFAULT_MAX_NEW_TOKENS = 16
SHORT_ANSWER_WORDS = 5  # NQ-open keeps answers of at most five tokens
# Part of every cached accuracy result's key (a study's accuracy units): raise it when a change
# here or in `lorasum.evaluate.accuracy_of` changes what a row scores
ACCURACY_VERSION = 1

# ---------------------------------------------------------------------------------------------
# Pure functions: picking an option, normalising and matching answers


def pick(logliks: Sequence[float] | torch.Tensor, lengths: Sequence[int]) -> tuple[int, int]:
    """(index of the highest log-likelihood, index of the highest log-likelihood per character).

    ``lengths``: each option's length in characters (lm-eval's ``len(choice)``, without the
    leading space of its continuation). Ties go to the first option, as ``np.argmax``."""
    ll = torch.as_tensor(logliks, dtype=torch.float64)  # (K,)
    per_char = ll / torch.as_tensor(lengths, dtype=torch.float64).clamp(min=1)  # (K,)
    return _first_argmax(ll), _first_argmax(per_char)


def _first_argmax(x: torch.Tensor) -> int:
    return int(torch.nonzero(x == x.max())[0, 0])


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's (and lm-eval's) normalisation: lowercase, punctuation removed, articles (a, an,
    the) removed, whitespace collapsed."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


# 1,000 / 12 / -3.5: thousands separators only in groups of three
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_NUMBER_FIRST = re.compile(r"^\s*-?\$?\d")


def numbers_in(text: str) -> list[float]:
    """Every number in ``text`` in order, as values ("1,000" → 1000.0)."""
    return [float(m.replace(",", "")) for m in _NUMBER.findall(text)]


def is_numeric(answer: str) -> bool:
    """An answer that starts with a number ("9 apples", "3:4", "$12.50")."""
    return bool(_NUMBER_FIRST.match(answer)) and bool(numbers_in(answer))


def answers_match(prediction: str, reference: str) -> bool:
    """Exact match of one prediction and one reference.

    A reference that starts with a number matches when the prediction's first numbers equal
    the reference's numbers, in order, as values (units and words ignored: "9 apples" ==
    "9", "3:4" != "3:5", "1,000" == "1000.0"); any other after `normalize_answer`."""
    if is_numeric(reference):
        want = numbers_in(reference)
        return numbers_in(prediction)[: len(want)] == want
    return normalize_answer(prediction) == normalize_answer(reference)


def exact_match(prediction: str, references: Sequence[str]) -> bool:
    """Whether the prediction matches any reference (`answers_match`)."""
    return any(answers_match(prediction, r) for r in references)


def is_short_answer(answer: str) -> bool:
    """Scored by exact match: numeric, or at most SHORT_ANSWER_WORDS words once normalised."""
    return is_numeric(answer) or 0 < len(normalize_answer(answer).split()) <= SHORT_ANSWER_WORDS


def first_line(generation: str) -> str:
    """A generation's first non-empty line (the prompt's answer is one line). Leading newlines
    are skipped, where lm-eval's ``until: ["\\n"]`` would leave an empty answer."""
    return generation.strip().split("\n", 1)[0].strip()


def row_kind(qa: QA) -> str:
    """How a row is scored: ``choice`` (options), ``match`` (short answer) or ``skip``."""
    if qa.choices is not None:
        return "choice"
    return "match" if is_short_answer(qa.answer) else "skip"


# ---------------------------------------------------------------------------------------------
# Tokenising options and prompts


def prompt_ids(tokenizer, question: str) -> list[int]:
    return tokenizer(prompt_text(question), add_special_tokens=True)["input_ids"]


def cut_left(prompt: list[int], keep: int, bos: int | None) -> list[int]:
    """The last ``keep`` tokens of ``prompt``, a leading BOS kept (as `tokenize_qa` cuts)."""
    if len(prompt) <= keep:
        return prompt
    head = prompt[:1] if bos is not None and prompt[:1] == [bos] else []
    body = prompt[len(head) :]
    n = max(0, keep - len(head))
    return head + (body[len(body) - n :] if n else [])


def tokenize_choice(tokenizer, question: str, option: str, max_length: int) -> Tokenized:
    """Context + ``" " + option`` (no EOS), only the option's tokens counted. Too long: the
    context is cut from the left (lm-eval's left truncation), and then the option, whose last
    ``max_length - 1`` tokens are kept at most (``truncated``)."""
    prompt = prompt_ids(tokenizer, question)
    option_ids = tokenizer(" " + option, add_special_tokens=False)["input_ids"]
    truncated = len(option_ids) > max_length - 1
    if truncated:
        ids = (prompt + option_ids)[-max_length:]
        return Tokenized(ids, [False] + [True] * (len(ids) - 1), truncated=True)
    prompt = cut_left(prompt, max_length - len(option_ids), tokenizer.bos_token_id)  # ≥ 1
    ids = prompt + option_ids
    return Tokenized(ids, [False] * len(prompt) + [True] * len(option_ids))


# ---------------------------------------------------------------------------------------------
# Batching options by question


def question_groups(
    sizes: Sequence[int], lengths: Sequence[int], batch_size: int
) -> list[list[int]]:
    """Questions (indices) per batch: whole questions only, at most ``batch_size`` sequences per
    batch unless one question has more options, the questions sorted by length (less padding)."""
    order = sorted(range(len(sizes)), key=lambda q: lengths[q])
    groups: list[list[int]] = []
    used = batch_size
    for q in order:
        if used + sizes[q] > batch_size:
            groups.append([])
            used = 0
        groups[-1].append(q)
        used += sizes[q]
    return groups


# ---------------------------------------------------------------------------------------------
# Per source: the numbers `lorasum eval --metric accuracy` reports


@dataclass
class Tally:
    """Counts of one source (or all): questions scored by options and by exact match."""

    questions: int = 0
    correct: int = 0
    correct_norm: int = 0
    generated: int = 0
    matched: int = 0
    skipped: int = 0

    def add(self, other: Tally) -> None:
        for k in vars(self):
            setattr(self, k, getattr(self, k) + getattr(other, k))

    def summary(self) -> dict:
        """acc, acc_norm and exact_match (None where nothing was scored) and the counts."""
        return {
            "acc": self.correct / self.questions if self.questions else None,
            "acc_norm": self.correct_norm / self.questions if self.questions else None,
            "questions": self.questions,
            "exact_match": self.matched / self.generated if self.generated else None,
            "generated": self.generated,
            "skipped": self.skipped,
        }


def format_accuracy(summary: dict) -> str:
    """One line of `Tally.summary` for people: what was scored how, and what was skipped."""
    parts = []
    if summary["questions"]:
        parts.append(
            f"acc {summary['acc']:.4f}  acc_norm {summary['acc_norm']:.4f}  "
            f"({summary['questions']} questions)"
        )
    if summary["generated"]:
        parts.append(f"exact match {summary['exact_match']:.4f}  ({summary['generated']} answers)")
    parts.append(f"{summary['skipped']} skipped")
    return "  ".join(parts)


def check_scorable(sources: Sequence, split: str) -> None:
    """Refuse data none of whose rows accuracy can score (no options, no short answer)."""
    if not any(row_kind(qa) != "skip" for s in sources for qa in s.splits[split]):
        names = ", ".join(s.name for s in sources)
        raise LorasumError(
            f"no row of the {split} split of {names} has options or a short answer, so "
            "--metric accuracy has nothing to score; give multiple-choice rows a choices field "
            "(see docs/MANUAL.md, 'Task accuracy') or use --metric perplexity"
        )
