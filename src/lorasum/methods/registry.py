"""The registry of merge methods: one explicit table, duplicates refused, unknown names listed.

A merge method is a pure function over one module's terms: the per-adapter factors (``None``
where an adapter does not adapt the module, i.e. a zero ΔW) and their weights. It returns the
merged ΔW of that module as LoRA factors (scale 1), plus how much of its own full result the
returned rank keeps. `lorasum.methods.engine.merge_adapters` runs it module by module.
A method with ``calibration=True`` also gets ``grams``: each adapter's per-token input Gram
matrix Ĝ_i at this module (`lorasum.analysis.calibration`).

A method declares the options it reads (`lorasum.methods.options.Option`, shared ones defined
once there, its own in its module); `MergeConfig` checks a merge's options against them and
the `compose` flags are generated from them (`all_options`, `option_help`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from lorasum.errors import LorasumError
from lorasum.factors import LoraFactors
from lorasum.methods.options import COMMON_OPTIONS, Option

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
    options: tuple[Option, ...] = ()  # the options it reads (`COMMON_OPTIONS` apart)
    required: frozenset[str] = frozenset()  # names of those that must be given
    notes: Mapping[str, str] = field(default_factory=dict)  # option name -> what it means here
    weights: Literal["optional", "required", "refused"] = "optional"
    exact: bool = False  # the result equals the weighted sum Σ w_i ΔW_i
    dense: bool = False  # builds each module's d_out×d_in ΔW (else: factored, small algebra)
    # needs each adapter's input statistics (lorasum.analysis.calibration); merge then also gets
    # grams=[Ĝ_i of this module (d_in, d_in) float64, per adapter]
    calibration: bool = False

    def __post_init__(self) -> None:
        names = [o.name for o in self.options]
        if len(set(names)) != len(names):
            raise ValueError(f"merge method {self.name!r} lists an option twice: {names}")
        for name in (*self.required, *self.notes):
            if name not in names:
                raise ValueError(f"merge method {self.name!r}: {name!r} is not one of its options")

    @property
    def option_names(self) -> frozenset[str]:
        """The names of the options it reads (`COMMON_OPTIONS` apart)."""
        return frozenset(o.name for o in self.options)


_REGISTRY: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    """Add a method; a second method with the same name is a bug and is refused."""
    if method.name in _REGISTRY:
        raise ValueError(f"merge method {method.name!r} is already registered")
    known = {o.name: o for o in all_options()}
    for option in method.options:
        if option in COMMON_OPTIONS:
            raise ValueError(f"merge method {method.name!r}: every method reads {option.name!r}")
        if known.get(option.name, option) is not option:  # one flag, one meaning
            raise ValueError(
                f"merge method {method.name!r}: option {option.name!r} is declared again; "
                f"import the existing declaration (read by {', '.join(readers(option.name))})"
            )
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


def all_options() -> list[Option]:
    """Every option of a registered method, once, in the order first declared, then
    `COMMON_OPTIONS` (what every method reads)."""
    seen: dict[str, Option] = {}
    for method in _REGISTRY.values():
        for option in method.options:
            seen.setdefault(option.name, option)
    return [*seen.values(), *COMMON_OPTIONS]


def readers(name: str) -> list[str]:
    """The registered methods that read option ``name``, in registration order."""
    return [m.name for m in _REGISTRY.values() if name in m.option_names]


def option_help(option: Option) -> str:
    """An option's help: what it is, its default, and what it does in each method that reads
    it (methods with the same note grouped: ``ties, dare_ties: required``)."""
    text = option.help
    if option.default is not None:
        text += f" (default {option.default})"
    if option in COMMON_OPTIONS:
        return text
    groups: dict[str, list[str]] = {}
    for method in _REGISTRY.values():
        if option.name in method.option_names:
            note = method.notes.get(option.name, "")
            if option.name in method.required:
                note = "required" + (f", {note}" if note else "")
            groups.setdefault(note, []).append(method.name)
    parts = [", ".join(names) + (f": {note}" if note else "") for note, names in groups.items()]
    return f"{text}. Methods: {'; '.join(parts)}"
