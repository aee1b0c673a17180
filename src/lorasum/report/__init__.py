"""The study's report: `build` turns results.json into blocks (`blocks`: sections, tables,
figures, notes) chosen by `sections` and `findings`, draws figures with `plots`, and renders
Markdown and one self-contained HTML file (`html`).

Nothing here trains or evaluates: the report reads only a finished study's results.json.
"""
