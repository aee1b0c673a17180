"""Merge methods on LoRA ΔW: one module per method, registered explicitly in one place.

>>> from lorasum.methods import method_names
>>> method_names()[:3]
['sum', 'weighted', 'mean']
"""

from lorasum.methods import (
    dare,
    iso,
    knots,
    lego,
    linear,
    pico,
    projection,
    regmean,
    shiftmatch,
    soft,
    svd,
    ties,
    tsv,
)
from lorasum.methods.options import Option
from lorasum.methods.registry import (
    MergeMethod,
    ModuleMerge,
    get_method,
    method_names,
    register,
)

# The one place where methods are registered (order = the order listed in help and errors).
for _method in (
    linear.SUM,
    linear.WEIGHTED,
    linear.MEAN,
    svd.SVD,
    ties.TIES,
    ties.MAGNITUDE_PRUNE,
    dare.DARE_LINEAR,
    dare.DARE_TIES,
    tsv.TSV,
    iso.ISO,
    pico.PICO,
    knots.KNOTS_TIES,
    knots.KNOTS_TA,
    lego.LORA_LEGO,
    regmean.REGMEAN,
    regmean.REGMEAN_RESCALED,
    projection.ORTHOGONAL_PROJECTION,
    soft.SOFT_PROJECTION,
    shiftmatch.SHIFT_MATCH,
):
    register(_method)

from lorasum.methods.config import MergeConfig  # noqa: E402
from lorasum.methods.engine import MergeResult, merge_adapters, resolve_weights  # noqa: E402

__all__ = [
    "MergeConfig",
    "MergeMethod",
    "MergeResult",
    "Option",
    "ModuleMerge",
    "get_method",
    "merge_adapters",
    "method_names",
    "register",
    "resolve_weights",
]
