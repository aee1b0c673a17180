"""Transfer predictors: from the single adapters' cross-domain results (needs a study's
cross-domain matrix: every single adapter on every domain's test split, `--cross-domain`).

- ``transfer``: mean over ordered pairs i ≠ j in the combination of the change of domain i's
  perplexity under adapter j relative to the base model, in % (negative: j helps i);
- ``transfer_share``: mean over ordered pairs of log(ppl_base,i / ppl_j,i) /
  log(ppl_base,i / ppl_i,i), the share of domain i's own adapter's gain that adapter j gets
  (1: as much as i's own; pairs whose own adapter does not lower the perplexity are skipped).

No weights and no model: the adapters have been trained and evaluated already, so these come
last, after the single adapters' evaluations (`TRANSFER`: the study's aggregation).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence

from lorasum.analysis.predictors.registry import Predictor, PredictorFamily, PredictorInputs
from lorasum.data.sources import combo_name
from lorasum.errors import LorasumError


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def transfer_predictor(
    cross_domain: Mapping, combos: Sequence[Sequence[str]]
) -> dict[str, dict[str, float | None]]:
    """combination name -> {"transfer", "transfer_share"} from a cross-domain perplexity matrix.

    ``cross_domain``: a study's ``cross_domain`` (results.json), or its ``perplexity`` table itself:
    adapter name (and "base") -> {domain: perplexity}.
    """
    table = cross_domain.get("perplexity", cross_domain)
    if "base" not in table:
        raise LorasumError("the cross-domain matrix has no 'base' row (the base model's ppl)")
    out = {}
    for combo in combos:
        changes, shares = [], []
        for i, j in itertools.permutations(combo, 2):
            try:
                base, own, other = table["base"][i], table[i][i], table[j][i]
            except KeyError:
                raise LorasumError(
                    f"the cross-domain matrix lacks adapter {j} or {i} on domain {i}; evaluate "
                    "every single adapter on every domain (--cross-domain)"
                ) from None
            changes.append((other / base - 1.0) * 100.0)
            if own < base:
                shares.append(math.log(base / other) / math.log(base / own))
        out[combo_name(combo)] = {"transfer": _mean(changes), "transfer_share": _mean(shares)}
    return out


def compute_transfer(inputs: PredictorInputs, combos) -> dict[str, dict[str, float | None]]:
    """`transfer_predictor` of ``inputs.cross_domain``."""
    return transfer_predictor(inputs.cross_domain, combos)


TRANSFER = PredictorFamily(
    name="transfer",
    predictors=(
        Predictor(
            "transfer",
            "cross-domain transfer (% ppl change of a domain under another's adapter)",
        ),
        Predictor(
            "transfer_share", "share of a domain's own-adapter gain that another's adapter gets"
        ),
    ),
    needs=frozenset({"cross_domain"}),
    compute=compute_transfer,
    summary="how much each single adapter changes the other domains' perplexity (a study's "
    "cross-domain matrix)",
)
