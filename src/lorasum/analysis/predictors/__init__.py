"""Interference predictors: one module per family, registered explicitly in one place.

Each family declares its predictor names (with the report's labels), what it needs
(`registry.Need`: adapters, calibration, base model + data, cross-domain results) and one
function over `PredictorInputs`. `lorasum predict`, the forecast, the study's units and the
report iterate this registry.

>>> from lorasum.analysis.predictors import predictor_names
>>> predictor_names(needing="cross_domain")
('transfer', 'transfer_share')
"""

from lorasum.analysis.predictors import activation, data, transfer, weight
from lorasum.analysis.predictors.registry import (
    NEEDS,
    Predictor,
    PredictorFamily,
    PredictorInputs,
    compute,
    families,
    family_of,
    get_family,
    predictor_labels,
    predictor_names,
    register,
)

# The one place where families are registered (order = the order of `lorasum predict --help`,
# the forecast's predictor ranking and the report's tables).
for _family in (
    weight.WEIGHT,
    activation.ACTIVATION,
    data.DATA,
    transfer.TRANSFER,
):
    register(_family)

# what `lorasum predict ADAPTER…` can compute (weights, and their domains' input statistics)
ADAPTER_NEEDS = frozenset({"adapters", "calibration"})

__all__ = [
    "ADAPTER_NEEDS",
    "NEEDS",
    "Predictor",
    "PredictorFamily",
    "PredictorInputs",
    "compute",
    "families",
    "family_of",
    "get_family",
    "predictor_labels",
    "predictor_names",
    "register",
]
