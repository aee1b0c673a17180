"""The registry of merge methods: one explicit table, duplicates refused, unknown names listed.

A merge method is a pure function over one module's terms: the per-adapter factors (``None``
where an adapter does not adapt the module, i.e. a zero ΔW) and their weights. It returns the
merged ΔW of that module as LoRA factors (scale 1), plus how much of its own full result the
returned rank keeps. `lorasum.methods.engine.merge_adapters` runs it module by module.
A method with ``calibration=True`` also gets ``grams``: each adapter's per-token input Gram
matrix Ĝ_i at this module (`lorasum.analysis.calibration`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from lorasum.errors import LorasumError
from lorasum.factors import LoraFactors

if TYPE_CHECKING:
    from lorasum.methods.config import MergeConfig


@dataclass(frozen=True)
class ModuleMerge:
    """One module's merged ΔW in LoRA form and what the returned rank kept of the method's result."""

    factors: LoraFactors
    kept_energy: float = 1.0  # ‖returned ΔW‖² / ‖method's full-rank ΔW‖² (1.0: exact)
    relative_error: float = 0.0  # ‖full − returned‖_F / ‖full‖_F (0.0: exact)
    details: dict = field(default_factory=dict)  # per-module facts for the recipe (JSON values)


MergeFn = Callable[[Sequence[LoraFactors | None], Sequence[float], "MergeConfig", str], ModuleMerge]


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method."""

    name: str
    merge: MergeFn  # (terms, weights, config, module name) -> ModuleMerge
    summary: str  # one line for --help and the model card
    options: frozenset[str] = field(default_factory=frozenset)  # MergeConfig fields it reads
    required: frozenset[str] = field(default_factory=frozenset)  # ... that must be given
    weights: Literal["optional", "required", "refused"] = "optional"
    exact: bool = False  # the result equals the weighted sum Σ w_i ΔW_i
    dense: bool = False  # builds each module's d_out×d_in ΔW (else: factored, small algebra)
    # needs each adapter's input statistics (lorasum.analysis.calibration); merge then also gets
    # grams=[Ĝ_i of this module (d_in, d_in) float64, per adapter]
    calibration: bool = False


_REGISTRY: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    """Add a method; a second method with the same name is a bug and is refused."""
    if method.name in _REGISTRY:
        raise ValueError(f"merge method {method.name!r} is already registered")
    _REGISTRY[method.name] = method
    return method


def get_method(name: str) -> MergeMethod:
    """The method called ``name``; an unknown name's error lists the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise LorasumError(
            f"unknown merge method {name!r}; choose one of: {', '.join(method_names())}"
        ) from None


def method_names() -> list[str]:
    """Registered names, in registration order."""
    return list(_REGISTRY)
