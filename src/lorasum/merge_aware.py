"""Merge-aware checkpoints: each single adapter's checkpoint chosen for the composition.

A converged run keeps the weights of its best validation point on its *own* domain; the sum of
such adapters need not be the best sum (late training tunes each adapter alone: Horoi et al.,
arXiv 2506.14126). With a study's ``merge_aware: true`` every single adapter also keeps its
weights at each validation point (``snapshots/step-<N>/``), and each combination picks its
singles' checkpoints by the **sum's perplexity on the validation rows of its domains** (never a
test row):

- the rule (`coordinate_choice`): start at every single's converged checkpoint (its best step);
  then, adapter by adapter in the combination's order, try each of its checkpoints with the
  others held and keep the one with the lowest validation perplexity (ties keep the current
  one); ``passes`` such passes (default one). Every scored choice is one evaluation of
  ``rows`` validation rows per domain, counted in the report.
- the cost: the evaluations' tokens (forward passes only) as a share of the merged-data
  adapter's training tokens (forward + backward), so the share overstates it (~3×).

The chosen checkpoints are then added exactly (`sum`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from lorasum.errors import LorasumError
from lorasum.io import read_json
from lorasum.settings import DataSettings

# rows: validation rows per domain that score a choice; passes: coordinate-descent passes
MERGE_AWARE_DEFAULTS = {"rows": 32, "passes": 1}


def checkpoints(adapter_dir: Path) -> dict[int, Path]:
    """{optimizer step: directory} of a single adapter's checkpoints: its validation-point
    snapshots and the adapter itself at its best step (the converged checkpoint)."""
    metrics = read_json(adapter_dir / "lorasum.json").get("metrics") or {}
    found = {}
    snaps = adapter_dir / "snapshots"
    if snaps.is_dir():
        for d in snaps.iterdir():
            if d.name.startswith("step-") and (d / "adapter_model.safetensors").is_file():
                found[int(d.name[len("step-") :])] = d
    best = metrics.get("best_step")
    if best is None:
        raise LorasumError(
            f"{adapter_dir} was not trained with validation (no best step); merge-aware "
            "checkpoints need the converged budget"
        )
    found[int(best)] = adapter_dir
    if len(found) < 2:
        raise LorasumError(
            f"{adapter_dir} kept no checkpoints besides its own; retrain it in a study with "
            "merge_aware: true"
        )
    return dict(sorted(found.items()))


def coordinate_choice(
    candidates: Sequence[Sequence[int]],
    start: Sequence[int],
    score: Callable[[tuple[int, ...]], float],
    passes: int = 1,
) -> tuple[tuple[int, ...], dict[tuple[int, ...], float]]:
    """The choice (one candidate per adapter) found by coordinate descent from ``start``.

    Adapter by adapter, in order, every candidate of it is scored with the others held, and the
    lowest score is kept (a tie keeps the current candidate; NaN counts as +inf); ``passes``
    passes, stopping early when a pass changes nothing. ``score`` is called once per distinct
    choice; returns (choice, {choice: score} of every scored choice)."""
    if len(candidates) != len(start) or any(
        s not in c for s, c in zip(start, candidates, strict=False)
    ):
        raise ValueError("start must hold one of each adapter's candidates")
    scores: dict[tuple[int, ...], float] = {}

    def scored(choice: tuple[int, ...]) -> float:
        if choice not in scores:
            value = float(score(choice))
            scores[choice] = math.inf if math.isnan(value) else value
        return scores[choice]

    choice = tuple(start)
    for _ in range(passes):
        before = choice
        for i, options in enumerate(candidates):
            best = scored(choice)
            for option in options:
                trial = (*choice[:i], option, *choice[i + 1 :])
                if scored(trial) < best:
                    choice, best = trial, scores[trial]
        if choice == before:
            break
    return choice, scores


def _choice_report(val_sources, rows, passes, points, converged, choice, scores) -> dict:
    """What `select_checkpoints` records of its choice (tokens and seconds added by it)."""
    return {
        "rule": f"coordinate descent from the converged checkpoints, {passes} pass(es), on the "
        "sum's validation perplexity",
        "split": "val",
        "rows_per_domain": {s.name: min(rows, len(s.splits["val"])) for s in val_sources},
        "chosen_steps": list(choice),
        "converged_steps": converged,
        "candidates": [list(p) for p in points],
        "val_perplexity": scores[choice],
        "val_perplexity_converged": scores[tuple(converged)],
        "evaluations": len(scores),
    }


def select_checkpoints(
    model,
    tokenizer,
    adapter_dirs: Sequence[Path],
    val_sources: Sequence,
    *,
    rows: int = MERGE_AWARE_DEFAULTS["rows"],
    passes: int = MERGE_AWARE_DEFAULTS["passes"],
    max_length: int = DataSettings.max_length,
    precision: str | None = None,
    batch_size: int = 32,
) -> tuple[list[Path], dict]:
    """Each adapter's checkpoint for their sum, by `coordinate_choice` on the sum's perplexity
    over the first ``rows`` validation rows of each of ``val_sources`` (one per adapter, pooled,
    token-weighted). ``model`` (the base) is left unchanged. Returns (the chosen checkpoint
    directories, a report: chosen and converged steps, validation perplexities, evaluations,
    tokens, seconds)."""
    from peft import PeftModel

    from lorasum.data.token_cache import tokenize_cached
    from lorasum.data.tokenize import make_batches
    from lorasum.evaluate import evaluate_batches
    from lorasum.models.precision import autocast_dtype
    from lorasum.peft_live import add_weighted_adapter

    if rows < 1 or passes < 1:
        raise LorasumError("merge-aware checkpoints: rows and passes must be >= 1")
    t0 = time.perf_counter()
    points = [checkpoints(Path(d)) for d in adapter_dirs]
    converged = [
        int(read_json(Path(d) / "lorasum.json")["metrics"]["best_step"]) for d in adapter_dirs
    ]
    items = [
        it for s in val_sources for it in tokenize_cached(tokenizer, [s], "val", max_length)[:rows]
    ]
    if not items:
        raise LorasumError("merge-aware checkpoints: the adapters' domains have no validation rows")
    batches = make_batches(items, batch_size, tokenizer.pad_token_id, shuffle=False)
    names = [s.name for s in val_sources]
    device = next(model.parameters()).device
    amp = autocast_dtype(precision, device)
    net = PeftModel.from_pretrained(model, str(adapter_dirs[0]), adapter_name="ckpt-base")
    loaded: set[str] = {"ckpt-base"}
    evaluated_tokens = 0

    def name_of(i: int, step: int) -> str:
        name = f"ckpt-{i}-{step}"
        if name not in loaded:
            net.load_adapter(str(points[i][step]), adapter_name=name)
            loaded.add(name)
        return name

    def score(choice: tuple[int, ...]) -> float:
        nonlocal evaluated_tokens
        adapters = [name_of(i, step) for i, step in enumerate(choice)]
        add_weighted_adapter(net, adapters, method="sum", adapter_name="ckpt-sum")
        try:
            result = evaluate_batches(net, batches, names, device, amp)
        finally:
            net.delete_adapter("ckpt-sum")
        evaluated_tokens += sum(int(b.attention_mask.sum()) for b in batches)
        return result["perplexity"]

    try:
        choice, scores = coordinate_choice([list(p) for p in points], converged, score, passes)
    finally:
        net.unload()
    report = _choice_report(val_sources, rows, passes, points, converged, choice, scores)
    report.update(tokens=evaluated_tokens, seconds=time.perf_counter() - t0)
    return [points[i][step] for i, step in enumerate(choice)], report
