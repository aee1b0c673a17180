"""How adapters interfere, before and after adding them: similarity of ΔW (`similarity`), the
domains' input Gram matrices (`calibration`) and mean gradients at the base model
(`gradients`), the interference predictors (`predictors`: a registry, one module per family),
Δ% forecast from finished studies (`forecast`, on `statistics`), and `lorasum predict`
(`predict`).

Below `lorasum.compose` (which calibrates its calibration methods here) and above the merge
methods; nothing here imports `lorasum.study`, `lorasum.report` or the CLI.
"""
