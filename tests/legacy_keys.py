"""Run a study with the pre-task code (lorasum at `test_tasks.LEGACY_COMMIT`, where a unit was a
kind string, a free function and its args) and write every unit's cache key as that code
computes it, for `tests/test_tasks.py` to compare with the task types' `key()`.

Not a test module: it runs in a subprocess whose PYTHONPATH is that commit's ``src``.

    python legacy_keys.py OUT SETTINGS.json VERSION KEYS.json

``VERSION``: the checkout's `lorasum.__version__`, given to the old code so that a version bump
(which changes every key on purpose) does not fail the comparison.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def legacy_key(u, lay) -> str | None:
    """A unit's cache key, as the pre-task code's probes compute it (its inputs must exist)."""
    from lorasum import calibration
    from lorasum.compose import compose_key
    from lorasum.methods import MergeConfig
    from lorasum.study import units

    if u.kind == "train":
        return u.key
    if u.kind == "eval":  # EvalSpec, AccuracySpec, RoutedSpec, ArrowSpec
        return u.args[0].key(lay.sources, lay.base_cfg)
    if u.kind == "compose":
        paths, _, method, options, _ = u.args
        return compose_key(paths, MergeConfig(method=method, **options))
    if u.kind == "calibrate":
        (adapter_dir,) = u.args
        return calibration._plan(adapter_dir, None, None, None, None, None, None).key
    if u.fn is units.calibrated_unit:
        method, paths, _, merged, val, options, max_length, _ = u.args
        return units.calibrated_key(method, paths, merged, val, options, max_length)
    if u.fn is units.merge_aware_unit:
        paths, _, _, val, options, cfg, _ = u.args
        return units.merge_aware_key(paths, val, options, cfg)
    if u.fn is units.predictors_unit:
        return units.predictors_key(*u.args[1:])
    if u.fn is units.data_predictors_unit:
        return units.data_predictors_key(*u.args[1:])
    raise ValueError(f"unknown unit {u.id}")


def main(out: str, settings_path: str, version: str, keys_path: str) -> None:
    import lorasum._version

    lorasum._version.__version__ = version  # before any module copies it
    from lorasum.study.plan import plan_study
    from lorasum.study.reproduce import reproduce, resolve

    settings = json.loads(Path(settings_path).read_text())
    reproduce(out, preset="tiny", progress=False, **settings)
    lay = resolve(out, "tiny", None, settings, False).layout
    keys = {
        u.id: {
            "kind": u.kind,
            "key": legacy_key(u, lay),
            "output": None if u.output is None else str(u.output),
            "deps": list(u.deps),
            "cost": u.cost,
            "memory_gb": u.resources.memory_gb,
            "label": u.label,
        }
        for u in plan_study(lay).units
    }
    Path(keys_path).write_text(json.dumps(keys, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])
