"""`dare_linear` and `dare_ties` on each module's dense ΔW, with PEFT's semantics.

DARE (Yu et al., ICML 2024, arXiv 2311.03099) as implemented by
`peft.utils.merge_utils.dare_linear` / `dare_ties`, called on the dense ΔW_i = s_i·B_i·A_i:
keep each entry with probability ``density`` (Bernoulli mask) and rescale the kept ones by
1/density; then the weighted sum (`dare_linear`) or TIES' sign election and disjoint mean
(`dare_ties`). At density 1 nothing is dropped and `dare_linear` equals `weighted`.

The masks come from torch's CPU generator, seeded per module from (``--seed``, module name),
so a result does not depend on the order modules are visited or on the global RNG, which is
left as it was.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from lorasum.factors import LoraFactors
from lorasum.methods.dense import RANK_NOTE, call_peft, dense_deltas, total_rank
from lorasum.methods.lowrank import dense_to_lora
from lorasum.methods.options import DENSITY, KEEP, MAJORITY_SIGN, RANK, SEED
from lorasum.methods.registry import MergeMethod, ModuleMerge

if TYPE_CHECKING:
    from lorasum.methods.config import MergeConfig


def module_seed(seed: int, module: str) -> int:
    """A 63-bit seed for one module's masks, from the user's seed and the module's name."""
    digest = hashlib.sha256(f"{seed}:{module}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


SEED_NOTE = "of the random masks"


def _dare(fn_name: str, terms, weights, config: MergeConfig, module: str, **kwargs) -> ModuleMerge:
    from peft.utils import merge_utils

    deltas = dense_deltas(terms)
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG untouched
        torch.manual_seed(module_seed(config.option("seed"), module))
        merged = call_peft(
            getattr(merge_utils, fn_name),
            deltas,
            weights,
            density=config.option("density"),
            **kwargs,
        )  # (d_out, d_in)
    return dense_to_lora(merged, config.option("rank"), config.option("keep"), total_rank(terms))


def merge_dare_linear(
    terms: Sequence[LoraFactors | None],
    weights: Sequence[float],
    config: MergeConfig,
    module: str,
) -> ModuleMerge:
    return _dare("dare_linear", terms, weights, config, module)


def merge_dare_ties(
    terms: Sequence[LoraFactors | None],
    weights: Sequence[float],
    config: MergeConfig,
    module: str,
) -> ModuleMerge:
    return _dare(
        "dare_ties",
        terms,
        weights,
        config,
        module,
        majority_sign_method=config.option("majority_sign"),
    )


DARE_LINEAR = MergeMethod(
    name="dare_linear",
    merge=merge_dare_linear,
    summary="DARE: random drop to --density, rescale 1/density, weighted sum (seeded; PEFT)",
    options=(DENSITY, SEED, RANK, KEEP),
    required=frozenset({"density"}),
    notes={"seed": SEED_NOTE, "rank": RANK_NOTE},
    dense=True,
)
DARE_TIES = MergeMethod(
    name="dare_ties",
    merge=merge_dare_ties,
    summary="DARE drop and rescale, then TIES sign election and disjoint mean (seeded; PEFT)",
    options=(DENSITY, SEED, MAJORITY_SIGN, RANK, KEEP),
    required=frozenset({"density"}),
    notes={"seed": SEED_NOTE, "rank": RANK_NOTE},
    dense=True,
)
