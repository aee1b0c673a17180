"""The study's report: report.md, a self-contained report.html and cosine_vs_delta.png.

``build_report`` (`sections`) turns a study's results (`lorasum.results_schema.Results`, or
the parsed results.json dict) into sections of plain blocks, figures included; ``render_markdown`` here and ``html.render_html`` render the
same sections. Fields that older studies lack (method × combination tables, statistics with
intervals, cross-domain perplexities, predictions, the run manifest) each skip their section
with a one-line note. ``rebuild_report(run_dir)`` rewrites the reports from
``run_dir/results.json`` (``lorasum report RUN_DIR``).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from lorasum.errors import LorasumError
from lorasum.io import atomic_write_text
from lorasum.report import plots
from lorasum.report.blocks import Bullets, Code, Figure, Note, Para, Section, Table
from lorasum.report.sections import build_report
from lorasum.results_schema import Results, as_results
from lorasum.results_schema import load_results as load_results_file

__all__ = ["build_report", "load_results", "rebuild_report", "render_markdown", "write_report"]

TITLE = "lorasum study: naive LoRA summation vs merged-data training"


def _md_table(t: Table) -> list[str]:
    def cell(i: int, j: int, text: str) -> str:
        text = text.replace("|", "\\|")
        return f"**{text}**" if (i, j) in t.marked and text else text

    out = [
        "| " + " | ".join(t.header) + " |",
        "|" + "|".join("---:" if a == "r" else "---" for a in t.align) + "|",
    ]
    out += [
        "| " + " | ".join(cell(i, j, c) for j, c in enumerate(r)) + " |"
        for i, r in enumerate(t.rows)
    ]
    return out


def render_markdown(results: Results | dict, sections: list[Section] | None = None) -> str:
    """report.md: the sections as markdown; figures link to figures/<name>.png."""
    results = as_results(results)
    sections = sections if sections is not None else build_report(results)
    lines = [f"# {TITLE}", ""]
    for s in sections:
        lines += [f"## {s.title}", ""]
        for b in s.blocks:
            if isinstance(b, Para):
                lines.append(b.text)
            elif isinstance(b, Note):
                lines.append(f"> Note: {b.text}")
            elif isinstance(b, Bullets):
                lines += [f"- {item}" for item in b.items]
            elif isinstance(b, Table):
                lines += _md_table(b)
            elif isinstance(b, Figure):
                lines += [f"![{b.name}](figures/{b.name}.png)", "", f"_{b.caption}_"]
            elif isinstance(b, Code):
                lines += ["```json", b.text, "```"]
            lines.append("")
    return "\n".join(lines)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp makes 0600; outputs are ordinary files
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_report(results: Results | dict, out: str | Path) -> dict[str, Path]:
    """Write report.md (figures in figures/), the self-contained report.html and
    cosine_vs_delta.png into ``out``; returns their paths."""
    from lorasum.report.html import render_html

    results = as_results(results)
    out = Path(out)
    sections = build_report(results, out)
    figures = [b for s in sections for b in s.blocks if isinstance(b, Figure)]
    for fig in figures:
        _atomic_write_bytes(out / "figures" / f"{fig.name}.png", fig.png)
    for old in (out / "figures").glob("*.png"):  # figures of an earlier report, now gone
        if old.stem not in {f.name for f in figures}:
            old.unlink()
    scatter = next((f for f in figures if f.name == "delta_vs_rms_cosine"), None)
    png = scatter.png if scatter else plots.delta_vs_predictor(results, "rms_cosine")
    if png:
        _atomic_write_bytes(out / "cosine_vs_delta.png", png)
    atomic_write_text(out / "report.md", render_markdown(results, sections))
    atomic_write_text(out / "report.html", render_html(results, sections, TITLE))
    return {
        "markdown": out / "report.md",
        "html": out / "report.html",
        "plot": out / "cosine_vs_delta.png",
    }


def load_results(run_dir: str | Path) -> Results:
    """``run_dir/results.json``, typed (`lorasum.results_schema.load_results`: older versions
    migrated, a newer one refused)."""
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        raise LorasumError(
            f"no results.json in {run_dir}; pass the --out directory of `lorasum reproduce`"
        )
    return load_results_file(path)


def rebuild_report(run_dir: str | Path) -> dict[str, Path]:
    """Rewrite report.md, report.html and cosine_vs_delta.png from ``run_dir/results.json``."""
    return write_report(load_results(run_dir), run_dir)
