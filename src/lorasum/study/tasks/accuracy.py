"""`AccuracyTask`: the accuracy twin ``acc-<name>`` of an evaluation (``metrics: [perplexity,
accuracy]``): the same adapter on the same rows, scored by `lorasum.evaluate.accuracy_of`
(acc / acc_norm over multiple-choice rows, exact match of greedy short answers), with a key of
its own: the perplexity evaluation's key, the metric, ``max_new_tokens``, `ACCURACY_VERSION`
and the rows' options and accepted answers. Perplexity units are untouched, so accuracy can be
added to a finished study. The numbers are `lorasum.study.accuracy`'s."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence

from lorasum.accuracy import ACCURACY_VERSION, DEFAULT_MAX_NEW_TOKENS, row_kind
from lorasum.data.sources import Source
from lorasum.io import config_key, write_json
from lorasum.models.precision import autocast_dtype
from lorasum.study import names
from lorasum.study.tasks.base import EVAL_BATCH_SIZE, job_cost, task_type
from lorasum.study.tasks.evaluate import EvalTask, eval_key


def scoring_fingerprint(rows) -> str:
    """What accuracy reads of the rows beyond question and answer (options, label, accepted
    answers), which `Source.fingerprint` leaves out."""
    h = hashlib.sha256()
    for qa in rows:
        h.update(repr((qa.choices, qa.label, qa.accepted)).encode() + b"\1")
    return h.hexdigest()[:16]


def rows_cost(sources: dict[str, Source], domains: Sequence[str], max_new_tokens: int) -> int:
    """Rows' worth of forward passes: one per option, ~max_new_tokens / 4 per generation."""
    n = 0
    for d in domains:
        for qa in sources[d].splits["test"]:
            kind = row_kind(qa)
            if kind == "choice":
                n += len(qa.choices)
            elif kind == "match":
                n += max(1, max_new_tokens // 4)
    return n


@task_type
class AccuracyTask(EvalTask):
    """Task accuracy of the adapter (None = the base model) on the test rows of ``domains``."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS

    @property
    def name(self) -> str:
        return names.accuracy_name(super().name)

    def cost(self) -> float:
        rows = rows_cost(self.sources, self.domains, self.max_new_tokens)
        return job_cost("eval", max(rows, 1), self.cfg.max_length)

    def key(self) -> str:
        return config_key(
            {
                "eval": eval_key(self.weights_key(), self.domains, self.sources, self.cfg),
                "metric": "accuracy",
                "max_new_tokens": self.max_new_tokens,
                "accuracy_version": ACCURACY_VERSION,
                "options": [
                    scoring_fingerprint(self.sources[d].splits["test"]) for d in self.domains
                ],
            }
        )

    def run(self, *, model, tokenizer, progress: bool = False) -> dict:
        """`lorasum.evaluate.accuracy_of` on the test splits, written atomically to ``path``
        with its key. ``model`` is left unchanged."""
        from lorasum.evaluate import accuracy_of

        key = self.key()
        device = next(model.parameters()).device
        net = model
        if self.adapter_dir is not None:
            from peft import PeftModel

            net = PeftModel.from_pretrained(model, str(self.adapter_dir))
        t0 = time.perf_counter()
        try:
            result = accuracy_of(
                net,
                tokenizer,
                [self.sources[d] for d in self.domains],
                "test",
                device,
                autocast_dtype(self.cfg.precision, device),
                self.cfg.max_length,
                EVAL_BATCH_SIZE,
                self.max_new_tokens,
            )
        finally:
            if self.adapter_dir is not None:
                net.unload()
        result["timing"] = {"seconds": time.perf_counter() - t0}
        write_json(self.path, {"key": key, "result": result})
        return result
