"""report.html: the report's sections as one self-contained HTML file.

Figures are embedded as ``data:image/png;base64`` URIs and the style sheet is inline: the file
opens offline, can be mailed or attached, and loads nothing from anywhere.
"""

from __future__ import annotations

import base64
import html
import re

from lorasum.report.blocks import Bullets, Code, Figure, Note, Para, Section, Table
from lorasum.results_schema import Results, as_results

CSS = """
body { font: 15px/1.5 -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       color: #222; background: #fafafa; margin: 0; }
main { max-width: 1080px; margin: 0 auto; padding: 24px 32px 64px; background: #fff;
       box-shadow: 0 0 12px rgba(0,0,0,.06); }
h1 { font-size: 24px; margin: 8px 0 4px; }
h2 { font-size: 19px; margin: 36px 0 10px; padding-bottom: 4px; border-bottom: 2px solid #e4e4e4; }
nav ol { columns: 3; column-gap: 32px; font-size: 13px; padding-left: 20px; margin: 8px 0 0; }
nav li { break-inside: avoid; }
nav a, h2 a { color: #2c5d9e; text-decoration: none; }
div.tablewrap { max-width: 100%; overflow-x: auto; }
table { border-collapse: collapse; margin: 10px 0; font-size: 13.5px; }
th, td { padding: 4px 10px; border-bottom: 1px solid #e6e6e6; vertical-align: top; }
th { background: #f0f3f7; text-align: left; font-weight: 600; }
td:first-child { white-space: nowrap; }
td.r, th.r { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
th.r { white-space: normal; }
tr:nth-child(even) td { background: #fafbfc; }
td.mark { font-weight: 700; background: #fff3c4 !important; }
figure { margin: 14px 0 20px; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
div.figrow { display: flex; flex-wrap: wrap; gap: 8px 20px; align-items: flex-start; }
div.figrow figure { flex: 1 1 440px; max-width: 520px; margin: 6px 0 12px; }
figcaption { font-size: 13px; color: #555; max-width: 900px; margin-top: 4px; }
p.note { color: #777; font-style: italic; border-left: 3px solid #ddd; padding-left: 10px; }
code { font: 12.5px ui-monospace, "DejaVu Sans Mono", monospace; background: #f3f3f3;
       padding: 0 3px; border-radius: 3px; }
pre { font: 12px/1.4 ui-monospace, "DejaVu Sans Mono", monospace; background: #f6f6f6;
      padding: 10px; overflow: auto; max-height: 320px; }
details summary { cursor: pointer; color: #2c5d9e; font-size: 13.5px; margin: 6px 0; }
section#meaning p { font-size: 15.5px; background: #f4f8fd; padding: 10px 14px;
                    border-left: 4px solid #2c5d9e; }
"""


def inline(text: str) -> str:
    """Markdown's inline `code` and **bold** in HTML, everything else escaped."""
    out = html.escape(text, quote=False)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)


def _table(t: Table) -> str:
    def cls(j: int, marked: bool = False) -> str:
        names = (["r"] if t.align[j] == "r" else []) + (["mark"] if marked else [])
        return f' class="{" ".join(names)}"' if names else ""

    head = "".join(f"<th{cls(j)}>{inline(h)}</th>" for j, h in enumerate(t.header))
    body = "\n".join(
        "<tr>"
        + "".join(f"<td{cls(j, (i, j) in t.marked)}>{inline(c)}</td>" for j, c in enumerate(row))
        + "</tr>"
        for i, row in enumerate(t.rows)
    )
    table = (
        f'<div class="tablewrap"><table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n'
        "</tbody>\n</table></div>"
    )
    if t.collapsed:
        return f"<details><summary>{html.escape(t.collapsed)}</summary>\n{table}\n</details>"
    return table


def _figure(f: Figure) -> str:
    data = base64.b64encode(f.png).decode("ascii")
    alt = html.escape(f.caption, quote=True)
    return (
        f'<figure id="fig-{f.name}"><img src="data:image/png;base64,{data}" alt="{alt}">'
        f"<figcaption>{inline(f.caption)}</figcaption></figure>"
    )


def _block(b) -> str:
    if isinstance(b, Para):
        return f"<p>{inline(b.text)}</p>"
    if isinstance(b, Note):
        return f'<p class="note">{inline(b.text)}</p>'
    if isinstance(b, Bullets):
        return "<ul>" + "".join(f"<li>{inline(i)}</li>" for i in b.items) + "</ul>"
    if isinstance(b, Table):
        return _table(b)
    if isinstance(b, Figure):
        return _figure(b)
    if isinstance(b, Code):
        return (
            f"<details><summary>{html.escape(b.label)}</summary><pre>"
            + html.escape(b.text)
            + "</pre></details>"
        )
    raise TypeError(f"unknown report block {type(b).__name__}")


def _blocks(blocks: list) -> str:
    """The blocks of one section; two or more figures in a row share a line (a wrapping row)."""
    out: list[str] = []
    row: list[Figure] = []
    for b in [*blocks, None]:
        if isinstance(b, Figure):
            row.append(b)
            continue
        if len(row) > 1:
            out.append('<div class="figrow">' + "".join(_figure(f) for f in row) + "</div>")
        elif row:
            out.append(_figure(row[0]))
        row = []
        if b is not None:
            out.append(_block(b))
    return "\n".join(out)


def render_html(results: Results | dict, sections: list[Section], title: str) -> str:
    """The whole report as one HTML document (inline CSS, images as data URIs)."""
    results = as_results(results)
    nav = "".join(f'<li><a href="#{s.anchor}">{html.escape(s.title)}</a></li>' for s in sections)
    body = "\n".join(
        f'<section id="{s.anchor}">\n<h2>{html.escape(s.title)}</h2>\n'
        + _blocks(s.blocks)
        + "\n</section>"
        for s in sections
    )
    subtitle = (
        f"model <code>{html.escape(str(results.model))}</code> · preset "
        f"<code>{html.escape(str(results.preset))}</code> · "
        f"{len(results.combinations)} combinations · "
        f"{len(results.seeds or [])} seed(s) · lorasum "
        f"{html.escape(results.lorasum_version or '')}"
    )
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n"
        f"<h1>{html.escape(title)}</h1>\n<p>{subtitle}</p>\n<nav><ol>{nav}</ol></nav>\n"
        f"{body}\n</main>\n</body>\n</html>\n"
    )
