"""How an adapter's A matrices are set, for adapters trained alone but meant to be added.

ΔW = s·B·A. Two adapters' sum interferes on the input side through Aᵢ·Aⱼᵀ: what one adapter's
A reads of an input, the other's can read too. Three policies (``TrainConfig.lora_a``):

- ``trained``: PEFT's LoRA, A and B trained (the default).
- ``frozen``: A stays at its seeded random initialisation and only B trains (LoRI, arXiv
  2504.07448): random high-dimensional A's are nearly orthogonal, and training cannot align them.
- ``disjoint``: A frozen at rows ``[slot·r, (slot+1)·r)`` of one seeded random orthonormal
  matrix per input width, shared by every adapter trained with the same ``a_seed``; adapters
  in different slots have Aᵢ·Aⱼᵀ = 0 exactly, so their sum has no input-side cross-talk by
  construction. In a study the slot is the domain's index.

A frozen A is still saved: the adapter is a plain PEFT LoRA.
"""

from __future__ import annotations

import functools
import hashlib
import logging

import torch
from torch import nn

from lorasum.errors import LorasumError
from lorasum.settings import LORA_A, LoraSettings

log = logging.getLogger(__name__)


def _width_seed(a_seed: int, width: int) -> int:
    """A generator seed per (a_seed, input width), the same in every process and run."""
    digest = hashlib.sha256(f"lorasum-disjoint-a:{a_seed}:{width}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@functools.lru_cache(maxsize=16)
def orthonormal_rows(width: int, rows: int, a_seed: int) -> torch.Tensor:
    """The first ``rows`` rows of a seeded random orthonormal basis of R^width, (rows, width)
    fp32: the QR (positive diagonal, so unique) of Gaussian vectors drawn one at a time, so the
    first k rows are the same whatever ``rows`` is asked for."""
    if rows > width:
        raise ValueError(f"{rows} orthonormal rows do not fit in width {width}")
    gen = torch.Generator().manual_seed(_width_seed(a_seed, width))
    cols = torch.stack(
        [torch.randn(width, generator=gen, dtype=torch.float64) for _ in range(rows)], dim=1
    )  # (width, rows)
    q, r = torch.linalg.qr(cols)  # (width, rows), (rows, rows)
    q = q * torch.sign(torch.diagonal(r))  # the unique factor with R's diagonal positive
    return q.t().to(torch.float32).contiguous()


def disjoint_block(width: int, rank: int, slot: int, a_seed: int) -> torch.Tensor:
    """Slot ``slot``'s A, (rank, width): rows ``[slot·rank, (slot+1)·rank)`` of the shared basis."""
    return orthonormal_rows(width, (slot + 1) * rank, a_seed)[slot * rank :].clone()


def _lora_a_weights(peft_model: nn.Module) -> dict[str, nn.Parameter]:
    """Every adapted module's A weight, (r, d_in), of the active adapter."""
    out = {}
    for name, module in peft_model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if isinstance(lora_a, nn.ModuleDict) and "default" in lora_a:
            out[name] = lora_a["default"].weight
    return out


def check_slot_fits(widths: dict[str, int], rank: int, slot: int) -> None:
    """Refuse in one line when slot ``slot`` of rank ``rank`` exceeds a module's input width."""
    need = (slot + 1) * rank
    narrow = {m: w for m, w in widths.items() if w < need}
    if narrow:
        module, width = min(narrow.items(), key=lambda kv: kv[1])
        raise LorasumError(
            f"--lora-a disjoint: slot {slot} at rank {rank} needs {need} input dimensions, but "
            f"{module} has {width} ({len(narrow)} module(s) too narrow); use a smaller "
            "--a-slot or --rank"
        )


def apply_lora_a(
    peft_model: nn.Module, policy: str, slot: int = 0, a_seed: int = LoraSettings.a_seed
) -> int:
    """Set and freeze every A of a freshly attached LoRA by ``policy``; the number frozen."""
    if policy == "trained":
        return 0
    if policy not in LORA_A:
        raise LorasumError(f"--lora-a {policy!r}: use one of {', '.join(LORA_A)}")
    weights = _lora_a_weights(peft_model)
    if policy == "disjoint":
        rank = next(iter(weights.values())).shape[0]  # PEFT gives every module rank r
        check_slot_fits({m: w.shape[1] for m, w in weights.items()}, rank, slot)
        with torch.no_grad():
            for w in weights.values():
                block = disjoint_block(w.shape[1], w.shape[0], slot, a_seed)
                w.copy_(block.to(w.dtype))
    for w in weights.values():
        w.requires_grad_(False)
    return len(weights)


def shared_slots(markers: dict[str, dict | None]) -> str | None:
    """A warning when adapters about to be added were trained ``disjoint`` in the same slot of
    the same basis (their A's then coincide, and the sum has the cross-talk it was meant to
    avoid); None when no two share one. ``markers``: adapter path → its lorasum.json (or None)."""
    seen: dict[tuple, list[str]] = {}
    for path, marker in markers.items():
        cfg = (marker or {}).get("config") or {}
        if cfg.get("lora_a") == "disjoint":
            slot = (cfg.get("a_seed", 0), cfg.get("a_slot", 0), cfg.get("rank"))
            seen.setdefault(slot, []).append(path)
    clashes = [(k, v) for k, v in seen.items() if len(v) > 1]
    if not clashes:
        return None
    (a_seed, slot, _), paths = clashes[0]
    return (
        f"{' and '.join(paths)} were trained with --lora-a disjoint in the same slot {slot} "
        f"(--a-seed {a_seed}): their A matrices coincide, so their sum is not free of "
        "input-side cross-talk; train each with its own --a-slot"
    )
