"""What the report is made of: plain blocks (paragraphs, tables, figures as PNG bytes,
notes) grouped in sections, and the number formatting every section shares.

Block text uses markdown's inline `code` and **bold**; ``report.render_markdown`` and
``html.render_html`` render the same blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lorasum.report.plots import is_number
from lorasum.results_schema import Combination, Pair

# ---------------------------------------------------------------------------------------------
# Blocks: what a section is made of (text uses markdown's `code` and **bold** inline)


@dataclass
class Para:
    text: str


@dataclass
class Note:
    """A section that the results cannot fill, and why (one line)."""

    text: str


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    align: str  # one letter per column: l or r
    marked: set[tuple[int, int]] = field(default_factory=set)  # (row, column) cells to stress
    collapsed: str = ""  # long tables: folded in the HTML under this summary


@dataclass
class Figure:
    name: str  # file stem beside report.md: figures/<name>.png
    png: bytes
    caption: str


@dataclass
class Code:
    label: str  # what the text is (the HTML folds it under this)
    text: str


@dataclass
class Section:
    title: str
    anchor: str
    blocks: list = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Number formatting


def fmt(x, digits: int = 2, signed: bool = False) -> str:
    if x is None:
        return "n/a"
    try:
        return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"
    except (TypeError, ValueError):
        return str(x)


def fmt_g(x) -> str:
    """A setting as written (``1``, ``0.1``, ``2e-04``), or n/a when absent."""
    if x is None:
        return "n/a"
    return f"{x:g}" if isinstance(x, int | float) else str(x)


def fmt_interval(value, ci, digits: int = 2, signed: bool = False) -> str:
    """`value [lo, hi]` when an interval exists, else the value."""
    text = fmt(value, digits, signed)
    if ci and ci[0] is not None and ci[1] is not None:
        return f"{text} [{fmt(ci[0], digits, signed)}, {fmt(ci[1], digits, signed)}]"
    return text


def fmt_delta(delta, ci, brief: bool = False) -> str:
    """A signed Δ% with its 95 % interval ``ci`` (unless ``brief``): shown only when the
    interval holds the value, as a t-interval of a mean over seeds always does (an interval of
    the perplexity instead would not)."""
    if brief or not (
        ci
        and is_number(delta)
        and is_number(ci[0])
        and is_number(ci[1])
        and ci[0] <= delta <= ci[1]
    ):
        ci = None
    return fmt_interval(delta, ci, 2, True)


def fmt_ci(r: Combination, key: str, digits: int = 2, signed: bool = False) -> str:
    """A combination's mean ``key`` as `mean [lo, hi]` when its 95% interval exists (several
    seeds: ``ci95[key]``), else the value."""
    return fmt_interval(getattr(r, key), (r.ci95 or {}).get(key), digits, signed)


def fmt_tokens(metrics: dict) -> str:
    """`all / in loss` training tokens of one adapter (older runs did not record them)."""
    if metrics.get("real_tokens") is None:
        return "n/a"
    return f"{metrics['real_tokens']:,} / {metrics['answer_tokens']:,}"


def combo_label(domains) -> str:
    return " + ".join(domains)


def pair_means(pairs: list[Pair]) -> list[dict]:
    """Pairs averaged over seeds (one row per pair, in first-seen order)."""
    groups: dict[tuple[str, str], list[Pair]] = {}
    for p in pairs:
        groups.setdefault((p.a, p.b), []).append(p)
    out = []
    for (a, b), ps in groups.items():
        out.append(
            {
                "a": a,
                "b": b,
                "rms_cosine": sum(p.rms_cosine for p in ps) / len(ps),
                "global_cosine": sum(p.global_cosine for p in ps) / len(ps),
                "max_abs": max(
                    (abs(v) for p in ps for v in (p.modules or {}).values()), default=None
                ),
            }
        )
    return out


def excludes_zero(lo, hi) -> bool:
    return lo is not None and hi is not None and (lo > 0 or hi < 0)
