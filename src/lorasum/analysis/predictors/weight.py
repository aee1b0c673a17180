"""Weight-space predictor: the paper's RMS cosine of ΔW (needs the adapters' weights alone).

Per pair, the cosine ⟨ΔW_i, ΔW_j⟩_F / ‖ΔW_i‖‖ΔW_j‖ of every shared module from the factors
(`lorasum.factors.module_cosines`) and its RMS over modules; per combination the RMS over its
pairs' RMS (`lorasum.analysis.similarity.combination_rms`, what a study records as
``rms_cosine``). Blind to which inputs the deltas see: the activation-space family weighs them.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping

from lorasum.analysis.predictors.registry import Predictor, PredictorFamily, PredictorInputs
from lorasum.analysis.similarity import combination_rms
from lorasum.data.sources import combo_name
from lorasum.errors import LorasumError
from lorasum.factors import Factors, module_cosines, rms, single_threaded


def cosine_predictors(adapters: Mapping[str, Factors]) -> dict:
    """The pairs of `activation.interference_predictors` with the weight cosine only (no input
    statistics: the activation predictors and cross-talk are None)."""
    names = list(adapters)
    pairs = []
    with single_threaded():
        for na, nb in itertools.combinations(names, 2):
            cos = module_cosines(adapters[na], adapters[nb])
            pairs.append(
                {
                    "a": na,
                    "b": nb,
                    "rms_cosine": rms(list(cos.values())),
                    "rms_activation_cosine": None,
                    "global_activation_cosine": None,
                    "cross_talk_b_to_a": None,
                    "cross_talk_a_to_b": None,
                    "modules": {m: {"cosine": c} for m, c in cos.items()},
                }
            )
    return {"names": names, "pairs": pairs}


def compute_weight(inputs: PredictorInputs, combos) -> dict[str, dict[str, float | None]]:
    """``rms_cosine`` of every combination from ``inputs.adapters``."""
    used = list(dict.fromkeys(d for c in combos for d in c))
    missing = [d for d in used if d not in inputs.adapters]
    if missing:
        raise LorasumError(f"no adapter for domain(s) {', '.join(missing)}")
    pairs = cosine_predictors({d: inputs.adapters[d] for d in used})["pairs"]
    return {combo_name(c): {"rms_cosine": combination_rms(pairs, c)} for c in combos}


WEIGHT = PredictorFamily(
    name="weight",
    predictors=(Predictor("rms_cosine", "RMS cosine of the adapters' ΔW"),),
    needs=frozenset({"adapters"}),
    compute=compute_weight,
    summary="RMS over modules of the cosine of the adapters' ΔW (the paper's predictor)",
)
