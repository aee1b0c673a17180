"""Every name a study gives its units and combinations, built here and nowhere else.

A unit's name is its identity in the plan (``kind/seed/name``), its ledger entry, its output's
file or directory name and the key its result is looked up by in the aggregation. Names are
only ever built from their parts (domains, a method, epochs); nothing parses one back.

    arith                          a single adapter (a training)
    arith@24steps                  a second single of arith under the `steps` budget
    merged-arith+colors            a combination's merged-data adapter (training, evaluation)
    single-arith                   the evaluation of arith's own single adapter
    sum-arith+colors               the sum (composition, evaluation)
    method-ties-arith+colors       a method's composition or fit (and its evaluation)
    variant-arith+colors+finance   the paper's variant: merged pair + third single, summed
    route-nearest-arith+colors     a routed evaluation
    snap-0.5ep-<name>              the same at a snapshot along the runs
    acc-<name>                     the accuracy twin of an evaluation
    calibrate-arith                a single adapter's input statistics
    gradients-arith                a domain's mean gradients at the base model (seed-free)
"""

from __future__ import annotations

from collections.abc import Sequence

from lorasum.data.sources import combo_name  # noqa: F401  (re-exported: the study names by it)

BASE = "base"  # the base model's evaluation
PREDICTORS = "predictors"  # a seed's activation-space predictors
DATA_PREDICTORS = "data-predictors"  # the study's adapter-free predictors
ACCURACY_PREFIX = "acc-"
GRADIENTS_DIR = "gradients"  # under the study directory: one directory per domain


def single_name(domain: str, steps: int | None = None) -> str:
    """A single adapter: the domain, or ``domain@Nsteps`` for a further step count."""
    return domain if steps is None else f"{domain}@{steps}steps"


def merged_name(combo: Sequence[str]) -> str:
    return f"merged-{combo_name(combo)}"


def training_name(domains: Sequence[str], steps: int | None = None) -> str:
    """A training: one domain's single adapter, or a combination's merged-data adapter."""
    return single_name(domains[0], steps) if len(domains) == 1 else merged_name(domains)


def single_eval_name(domain: str) -> str:
    return f"single-{domain}"


def composition_name(method: str, combo: Sequence[str]) -> str:
    """The sum's (``sum-a+b``) or another method's (``method-ties-a+b``) composition."""
    c = combo_name(combo)
    return f"sum-{c}" if method == "sum" else f"method-{method}-{c}"


def variant_dir(pair: Sequence[str], third: str) -> str:
    """``a+b+c``: where the variant of merged pair + third single lies (under variants/)."""
    return f"{combo_name(pair)}+{third}"


def variant_name(pair: Sequence[str], third: str) -> str:
    return f"variant-{variant_dir(pair, third)}"


def route_name(route: str, combo: Sequence[str]) -> str:
    return f"route-{route}-{combo_name(combo)}"


def snapshot_label(epochs: float) -> str:
    """``0.5ep``: a snapshot's directory under snapshots/ and its part of unit names."""
    return f"{epochs:g}ep"


def snapshot_name(epochs: float | None, name: str) -> str:
    """``name`` at the snapshot at ``epochs`` (None: the finished adapters, ``name`` itself)."""
    return name if epochs is None else f"snap-{snapshot_label(epochs)}-{name}"


def accuracy_name(name: str) -> str:
    """The accuracy twin of the evaluation ``name``."""
    return f"{ACCURACY_PREFIX}{name}"


def calibration_name(single: str) -> str:
    return f"calibrate-{single}"


def gradients_name(domain: str) -> str:
    """A domain's gradient statistics (the unit; its directory is ``gradients/<domain>``)."""
    return f"gradients-{domain}"
