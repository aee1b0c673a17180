"""The study: settings → plan (frozen units with keys, dependencies, resources, cost) →
executor (runs what is not cached) → results.json → report.

Nothing below this package imports it; `lorasum.cli` and `lorasum.study.reproduce` call it.
"""
