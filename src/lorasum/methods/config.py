"""MergeConfig: a merge method and the options given for it, validated once against the options
that method declares (`MergeMethod.options`, `lorasum.methods.options.Option`).

An option not given (or given as ``None``) takes its declared default; an option the method does
not read is refused instead of silently ignored. `resolved()` fills in the defaults and is what
the recipe records (and what cache keys hash). The `compose` CLI flags are generated from the
same declarations (`lorasum.methods.registry.all_options`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lorasum.errors import raise_all
from lorasum.methods.options import COMMON_OPTIONS, Option
from lorasum.methods.registry import all_options, get_method, readers


def _known() -> dict[str, Option]:
    return {o.name: o for o in all_options()}


class MergeConfig:
    """How to merge: ``MergeConfig(method="ties", density=0.2)``; the options are those the
    registered methods declare (an unknown name is a TypeError, like any unknown keyword)."""

    __slots__ = ("method", "_given")

    def __init__(self, method: str = "sum", **options: Any) -> None:
        known = _known()
        for name in options:
            if name not in known:
                raise TypeError(
                    f"MergeConfig.__init__() got an unexpected keyword argument {name!r}"
                )
        self.method = method
        given = {n: v for n, v in options.items() if v is not None}
        # in the declaration order, whatever the order given
        self._given = {n: given[n] for n in known if n in given}
        self._validate(known)

    def _validate(self, known: dict[str, Option]) -> None:
        """Every problem at once: each value by its option's check, then options the method
        does not read, then required ones missing, then options that only apply with another."""
        problems: list[str] = []
        method = get_method(self.method)  # an unknown name lists the known ones
        for name, value in self._given.items():
            self._given[name], problem = known[name].problem(value)
            if problem is not None:
                problems.append(problem)
        own = method.option_names
        for name in self._given:
            if name not in own and known[name] not in COMMON_OPTIONS:
                problems.append(
                    f"{known[name].flag} does not apply to {method.name} (it applies to "
                    f"{', '.join(readers(name))})"
                )
        for name in sorted(method.required - set(self._given)):
            option = known[name]
            problems.append(f"{method.name} needs {option.required_hint or option.flag}")
        for option in method.options:
            if option.name in self._given and not self._applies(option):
                problems.append(f"{option.flag} only applies with {option.only_with_text}")
        raise_all(problems, f"compose --method {self.method}")

    def _applies(self, option: Option) -> bool:
        return option.only_with is None or option.only_with(self._given)

    def given(self) -> list[str]:
        """Names of the options that were given (not None), the method excluded."""
        return list(self._given)

    def resolved(self) -> dict[str, Any]:
        """The method and every option it reads, defaults filled in (saved in the recipe)."""
        method = get_method(self.method)
        out: dict[str, Any] = {"method": method.name}
        for option in sorted(method.options, key=lambda o: o.name):
            if self._applies(option):  # e.g. keep only means something with --rank auto
                out[option.name] = self._given.get(option.name, option.default)
        for option in COMMON_OPTIONS:
            out[option.name] = self._given.get(option.name, option.default)
        return out

    def option(self, name: str) -> Any:
        """An option's value, its default where it was not given."""
        return self._given.get(name, _known()[name].default)

    def __getattr__(self, name: str) -> Any:
        """``config.density``: a declared option's value, as `option` (attribute reads kept)."""
        if not name.startswith("_") and name in _known():
            return self.option(name)
        raise AttributeError(f"MergeConfig has no option {name!r}")

    def replace(self, **options: Any) -> MergeConfig:
        """The same method with ``options`` given too (checked again)."""
        return MergeConfig(self.method, **{**self._given, **options})

    def options(self) -> Mapping[str, Any]:
        """The given options (a copy): ``MergeConfig(config.method, **config.options())``."""
        return dict(self._given)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MergeConfig):
            return NotImplemented
        return (self.method, self._given) == (other.method, other._given)

    def __hash__(self) -> int:
        return hash((self.method, tuple(self._given.items())))

    def __repr__(self) -> str:
        args = "".join(f", {k}={v!r}" for k, v in self._given.items())
        return f"MergeConfig(method={self.method!r}{args})"
