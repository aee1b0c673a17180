"""The registry of interference predictors: one explicit table of families, duplicates refused,
unknown names listed.

A *family* is one module of `lorasum.analysis.predictors` that computes a few predictors
together from the same inputs (the activation-space ones share one pass over the Gram
matrices). It declares the names it produces (with the report's label for each), what it
needs, and one function: ``compute(inputs, combos) -> {"a+b": {name: value}}`` for each
combination of domains (value None where undefined).

What a family may need (`Need`), by when it is available:

- ``adapters``: each domain's trained adapter (factors), the weights alone;
- ``calibration``: each domain's per-token input Gram matrices Ĝ at the adapted modules
  (`lorasum.analysis.calibration`);
- ``base_model_data``: the base model, its tokenizer and the domains' training rows, before any
  training;
- ``cross_domain``: the single adapters' perplexities on every domain's test split (a study's
  cross-domain matrix).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

from lorasum.data.sources import combo_name
from lorasum.errors import LorasumError

Need = Literal["adapters", "calibration", "base_model_data", "cross_domain"]
NEEDS: tuple[str, ...] = get_args(Need)


@dataclass
class PredictorInputs:
    """What predictors read; each family declares the fields it needs (`Need`)."""

    adapters: Mapping[str, Any] | None = None
    """``adapters``: domain -> its adapter's factors (module -> `lorasum.factors.LoraFactors`)."""
    grams: Mapping[str, Any] | None = None
    """``calibration``: domain -> its `Calibration`, or module -> per-token Gram matrix Ĝ."""
    model: Any = None
    """``base_model_data``: the base model, run as it is (fp32 recommended)."""
    tokenizer: Any = None
    """``base_model_data``: the base model's tokenizer."""
    sources: Mapping[str, Any] | None = None
    """``base_model_data``: domain -> `lorasum.data.Source` (its train split is read)."""
    max_length: int | None = None
    """``base_model_data``: tokens per row."""
    model_spec: str | None = None
    """``base_model_data``: the base model's name, for the gradient cache's key."""
    gradients: Mapping[str, Any] | None = None
    """``base_model_data``, already computed: domain -> its mean gradients at the base model
    (`lorasum.analysis.gradients.DomainGradients`, a study's per-domain units); the data
    family compares these instead of computing them."""
    cross_domain: Mapping | None = None
    """``cross_domain``: adapter name (and "base") -> {domain: perplexity}."""

    def available(self) -> frozenset[str]:
        """The needs these inputs satisfy."""
        have = {
            "adapters": self.adapters is not None,
            "calibration": self.grams is not None,
            "base_model_data": (
                self.model is not None
                and self.tokenizer is not None
                and self.sources is not None
                and self.max_length is not None
            ),
            "cross_domain": self.cross_domain is not None,
        }
        return frozenset(n for n, ok in have.items() if ok)


Combos = Sequence[Sequence[str]]
ComputeFn = Callable[[PredictorInputs, Combos], dict[str, dict[str, float | None]]]


@dataclass(frozen=True)
class Predictor:
    """One predictor name a family produces."""

    name: str
    label: str | None = None  # the report's axis label (None: the report shows the name)


@dataclass(frozen=True)
class PredictorFamily:
    """A registered family of predictors."""

    name: str
    predictors: tuple[Predictor, ...]  # in the order results.json and tables list them
    needs: frozenset[str]  # of `NEEDS`
    compute: ComputeFn  # (inputs, combinations) -> combination name -> {predictor: value}
    summary: str  # one line for docs and errors

    def __post_init__(self) -> None:
        unknown = sorted(set(self.needs) - set(NEEDS))
        if unknown or not self.needs:
            raise ValueError(
                f"predictor family {self.name!r} needs {sorted(self.needs)}; "
                f"each need is one of {', '.join(NEEDS)}"
            )

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.predictors)


_REGISTRY: dict[str, PredictorFamily] = {}


def register(family: PredictorFamily) -> PredictorFamily:
    """Add a family; a second family or predictor of the same name is a bug and is refused."""
    if family.name in _REGISTRY:
        raise ValueError(f"predictor family {family.name!r} is already registered")
    taken = {n: f.name for f in _REGISTRY.values() for n in f.names}
    clash = [n for n in family.names if n in taken]
    if clash or len(set(family.names)) != len(family.names):
        raise ValueError(f"predictor {clash or family.names} of {family.name!r} is already taken")
    _REGISTRY[family.name] = family
    return family


def get_family(name: str) -> PredictorFamily:
    """The family called ``name``; an unknown name's error lists the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise LorasumError(
            f"unknown predictor family {name!r}; choose one of: {', '.join(_REGISTRY)}"
        ) from None


def families(
    available: Iterable[str] | None = None, needing: str | None = None
) -> list[PredictorFamily]:
    """Registered families in registration order: those computable from ``available`` needs
    (None: all), and of those the ones that need ``needing`` (None: any)."""
    have = None if available is None else frozenset(available)
    if needing is not None and needing not in NEEDS:
        raise ValueError(f"unknown need {needing!r}; one of {', '.join(NEEDS)}")
    return [
        f
        for f in _REGISTRY.values()
        if (have is None or f.needs <= have) and (needing is None or needing in f.needs)
    ]


def predictor_names(
    available: Iterable[str] | None = None, needing: str | None = None
) -> tuple[str, ...]:
    """Predictor names of `families` (same filters), in registration order."""
    return tuple(n for f in families(available, needing) for n in f.names)


def family_of(predictor: str) -> PredictorFamily:
    """The family that produces ``predictor``; an unknown name's error lists the known ones."""
    for f in _REGISTRY.values():
        if predictor in f.names:
            return f
    raise LorasumError(
        f"unknown predictor {predictor!r}; choose one of: {', '.join(predictor_names())}"
    )


def predictor_labels() -> dict[str, str]:
    """Predictor name -> the report's axis label, for the predictors that have one."""
    return {p.name: p.label for f in _REGISTRY.values() for p in f.predictors if p.label}


def compute(
    chosen: Sequence[PredictorFamily], inputs: PredictorInputs, combos: Combos
) -> dict[str, dict[str, float | None]]:
    """Combination name ("a+b") -> {predictor: value} of every ``chosen`` family, in their
    order; a family whose needs ``inputs`` lack is refused, by name, before any runs."""
    have = inputs.available()
    problems = [
        f"{f.name} needs {', '.join(sorted(f.needs - have))}" for f in chosen if f.needs - have
    ]
    if problems:
        raise LorasumError("missing predictor inputs: " + "; ".join(problems))
    out: dict[str, dict[str, float | None]] = {combo_name(c): {} for c in combos}
    for f in chosen:
        for name, values in f.compute(inputs, combos).items():
            out.setdefault(name, {}).update(values)
    return out
