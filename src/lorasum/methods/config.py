"""MergeConfig: the options of a merge, validated once against the chosen method.

Every field defaults to ``None`` ("not given") so that an option the method does not read is
refused instead of silently ignored; `resolved()` fills in the method's defaults and is what
the recipe records. The `compose` CLI flags are generated from these fields and their help.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from lorasum.errors import raise_all
from lorasum.methods.registry import get_method, method_names

#: Defaults filled in by `MergeConfig.resolved` for the options a method reads.
DEFAULTS: dict[str, Any] = {
    "keep": 0.99,
    "majority_sign": "total",
    "seed": 0,
    "method_scale": 1.0,
    "regmean_alpha": 0.9,
    "projection_ratio": 4.0,
}
MAJORITY_SIGN = ("total", "frequency")
_REQUIRED_HINT = {
    "rank": "--rank K (an integer) or --rank auto",
    "density": "--density (the fraction of ΔW entries kept, e.g. 0.2)",
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass
class MergeConfig:
    """How to merge: the method and its options (``None`` = not given / the method's default)."""

    method: str = field(
        default="sum",
        metadata={"help": f"merge method (default sum): {', '.join(method_names())}"},
    )
    rank: str | int | None = field(
        default=None,
        metadata={
            "help": "rank of the result: K, or 'auto' (per module the smallest rank "
            "keeping --keep of the energy); svd: required; ties/dare/magnitude_prune: "
            "default the file's rank (the largest Σr over modules); pico: default Σr; "
            "tsv/iso/knots_*: default their own rank; lora_lego: the number of "
            "clusters (an integer, default the largest input rank); the calibration methods "
            "(regmean, …, shift_match): default Σr (exact)"
        },
    )
    keep: float | None = field(
        default=None,
        metadata={"help": "with --rank auto: fraction of the Frobenius energy kept (default 0.99)"},
    )
    density: float | None = field(
        default=None,
        metadata={
            "help": "ties/dare/magnitude_prune: fraction of each ΔW's entries kept, (0, 1]; "
            "knots_ties: of each task's ΣVᵢᵀ"
        },
    )
    majority_sign: str | None = field(
        default=None,
        metadata={
            "help": "ties/dare_ties/knots_ties: sign election by 'total' (default) or 'frequency'"
        },
    )
    seed: int | None = field(
        default=None,
        metadata={
            "help": "dare_linear/dare_ties: seed of the random masks; lora_lego: of the "
            "k-means initialisation (default 0)"
        },
    )
    method_scale: float | None = field(
        default=None, metadata={"help": "tsv/iso: overall scaling coefficient α (default 1.0)"}
    )
    task_rank: int | None = field(
        default=None,
        metadata={
            "help": "tsv: singular directions kept per task (default: the paper's "
            "min(d_out, d_in)/T, capped at each task's rank)"
        },
    )
    regmean_alpha: float | None = field(
        default=None,
        metadata={
            "help": "regmean/regmean_rescaled: off-diagonal shrinkage of each input Gram "
            "matrix, G ← α·G + (1−α)·diag(G), in [0, 1] (default 0.9, the paper's)"
        },
    )
    projection_ratio: float | None = field(
        default=None,
        metadata={
            "help": "orthogonal_projection: drop an input direction from ΔW_i where the other "
            "domains' input energy is more than this many times domain i's (default 4)"
        },
    )
    pad_rank_to: int | None = field(
        default=None,
        metadata={"help": "pad the written adapter with zeros to this rank (a serving rank)"},
    )

    def __post_init__(self) -> None:
        problems: list[str] = []
        method = get_method(self.method)  # an unknown name lists the known ones
        if isinstance(self.rank, str) and self.rank != "auto":
            try:
                self.rank = int(self.rank)
            except ValueError:
                problems.append(f"--rank {self.rank!r}: expected an integer or 'auto'")
        if isinstance(self.rank, bool) or (isinstance(self.rank, int) and self.rank < 1):
            problems.append(f"--rank {self.rank}: must be ≥ 1 or 'auto'")
        if self.keep is not None and not (0.0 < self.keep <= 1.0):
            problems.append(f"--keep {self.keep}: must be in (0, 1]")
        if self.density is not None and not (0.0 < self.density <= 1.0):
            problems.append(f"--density {self.density}: must be in (0, 1]")
        if self.majority_sign is not None and self.majority_sign not in MAJORITY_SIGN:
            problems.append(
                f"--majority-sign {self.majority_sign!r}: choose {' or '.join(MAJORITY_SIGN)}"
            )
        if self.seed is not None and self.seed < 0:
            problems.append(f"--seed {self.seed}: must be ≥ 0")
        if self.method_scale is not None and not math.isfinite(self.method_scale):
            problems.append(f"--method-scale {self.method_scale}: must be a finite number")
        if self.regmean_alpha is not None and not (0.0 <= self.regmean_alpha <= 1.0):
            problems.append(f"--regmean-alpha {self.regmean_alpha}: must be in [0, 1]")
        if self.projection_ratio is not None and not (
            math.isfinite(self.projection_ratio) and self.projection_ratio > 0
        ):
            problems.append(f"--projection-ratio {self.projection_ratio}: must be > 0")
        for name in ("task_rank", "pad_rank_to"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"{_flag(name)} {value}: must be ≥ 1")
        for name in self.given():
            if name != "pad_rank_to" and name not in method.options:
                users = [m for m in method_names() if name in get_method(m).options]
                problems.append(
                    f"{_flag(name)} does not apply to {method.name} (it applies to "
                    f"{', '.join(users)})"
                )
        for name in sorted(method.required - set(self.given())):
            problems.append(f"{method.name} needs {_REQUIRED_HINT.get(name, _flag(name))}")
        if self.keep is not None and self.rank != "auto" and "keep" in method.options:
            problems.append("--keep only applies with --rank auto")
        raise_all(problems, f"compose --method {self.method}")

    def given(self) -> list[str]:
        """Names of the options that were given (not None), the method excluded."""
        return [
            f.name for f in fields(self) if f.name != "method" and getattr(self, f.name) is not None
        ]

    def resolved(self) -> dict[str, Any]:
        """The method and every option it reads, defaults filled in (saved in the recipe)."""
        method = get_method(self.method)
        out: dict[str, Any] = {"method": method.name}
        for name in sorted(method.options):
            if name == "keep" and self.rank != "auto":
                continue  # keep only means something with --rank auto
            value = getattr(self, name)
            out[name] = DEFAULTS.get(name) if value is None else value
        out["pad_rank_to"] = self.pad_rank_to
        return out

    def option(self, name: str) -> Any:
        """An option's value with the default filled in."""
        value = getattr(self, name)
        return DEFAULTS.get(name) if value is None else value
