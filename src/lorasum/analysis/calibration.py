"""Input statistics of a domain at every adapted module: Gram matrices, cached per domain.

For an adapter and its domain's data, every adapted module m (``nn.Linear`` or GPT-2 ``Conv1D``)
gets

    G_m = Σ_t x_t x_tᵀ   (d_in, d_in)        n_m = number of tokens t

over the non-padding tokens t of the data (the batch attention mask; prompt *and* answer
tokens: the inputs are unlabelled). x_t is the module's input. The interference-aware merges
(`lorasum.methods.regmean`, `…projection`) and the predictors (`lorasum.analysis.predictors`) use the
per-token second moment Ĝ_m = G_m / n_m, so every domain weighs the same whatever its size.

Choices, and why:

- **Base model, adapter not applied.** The inputs are those of the base model. RegMean
  (arXiv 2212.09849) takes each fine-tuned model's own activations; with LoRA the adapter
  shifts the inputs of later layers only slightly, the base model's statistics of a domain
  do not depend on which adapter they are used with (one definition for every method and
  predictor), and the composed model's inputs are unknown before composing anyway.
- **Default data = the adapter's own training split**, as recorded in its ``lorasum.json``
  (``config.data``, ``split_seed``, ``max_train``, ``max_length``, field names). An adapter
  trained elsewhere has no such record: pass explicit sources (the train split of each,
  seeded 80/10/10 split as everywhere in lorasum).
- **fp32 forward, float64 sums.** Each batch's Xᵀ X is a float64 product (fp32 products
  over a batch's ~2k tokens left rounding of ~1e-6 that made rank-deficient Grams
  indefinite), added into a float64 accumulator. Modules that read the same tensor (q/k/v
  projections) share one product and one stored matrix.
- **Cache**: ``$LORASUM_HOME/calibration/calibration-<key>.safetensors``, written
  atomically, fp32 on disk, each symmetric matrix as its packed upper triangle (a quarter of
  the bytes of a float64 square; a freshly computed result is rounded the same way, so results
  do not depend on the cache). The key hashes what the statistics depend on — the data's
  fingerprints, the model spec, max_length and the module list — and not the adapter: every
  adapter of a domain (every seed and budget of a study, every study) shares one file, so a
  3-seed study calibrates each domain once. (Earlier versions kept a file beside each adapter,
  keyed by its weights too; those files are no longer read.)
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lorasum._version import __version__
from lorasum.adapters import Adapter, check_fits, delta_shape, read_adapter
from lorasum.data.sources import Source
from lorasum.data.split import load_split
from lorasum.data.tokenize import make_batches
from lorasum.errors import LorasumError
from lorasum.io import MARKER, commit_temp, config_key, read_json, temp_beside
from lorasum.settings import EVAL_BATCH_SIZE, DataSettings, RuntimeSettings

log = logging.getLogger(__name__)

FILE_PREFIX = "calibration-"
# where an adapter's lorasum.json does not say (trained elsewhere): the settings' defaults
DEFAULT_MAX_LENGTH = DataSettings.max_length
DEFAULT_SPLIT_SEED = DataSettings.split_seed


@dataclass
class Calibration:
    """Per-module input statistics of one domain: raw Gram sums and token counts."""

    grams: dict[str, torch.Tensor]  # module -> Σ x xᵀ (d_in, d_in), float64
    tokens: dict[str, int]  # module -> number of tokens summed
    key: str
    path: Path | None = None  # the cache file, when there is one
    info: dict = field(default_factory=dict)  # data fingerprints, model, max_length, seconds
    computed: bool = False  # True when this call ran the model (False: read from the cache)

    def normalised(self) -> dict[str, torch.Tensor]:
        """module -> Ĝ = G / n (float64): the per-token second moment of the inputs.

        Modules that read one input (q/k/v) share one matrix object here as in ``grams``, so
        the methods factor it once (they cache by identity) and it is held once in memory.
        """
        done: dict[tuple[int, int], torch.Tensor] = {}
        out = {}
        for m, g in self.grams.items():
            n = max(self.tokens[m], 1)
            key = (id(g), n)
            if key not in done:
                done[key] = g.double() / n
            out[m] = done[key]
        return out

    def take_normalised(self) -> dict[str, torch.Tensor]:
        """`normalised` without a copy: the float64 sums are divided in place and this object
        keeps no matrices (``grams`` empties), so a caller holds each domain's statistics once.
        """
        groups: dict[int, list[str]] = {}
        for m, g in self.grams.items():
            groups.setdefault(id(g), []).append(m)
        out = {}
        for modules in groups.values():
            g = self.grams[modules[0]]
            counts = {max(self.tokens[m], 1) for m in modules}
            if len(counts) == 1 and g.dtype == torch.float64:
                shared = g.div_(counts.pop())
                out.update(dict.fromkeys(modules, shared))
            else:  # shared by modules with other token counts, or not float64: copies
                out.update({m: g.double() / max(self.tokens[m], 1) for m in modules})
        self.grams = {}
        return out

    def per_token(self, *, from_file: bool = False) -> PerTokenGrams:
        """module -> Ĝ, each normalised when it is asked for and not kept.

        ``from_file``: read each matrix from the cache file on access (equal to the in-memory
        one: both are rounded the same way), so that the caller can drop this object and hold
        no Gram matrix between uses; in memory when there is no cache file.
        """
        if from_file and self.path is not None and self.path.is_file():
            return _file_grams(self.path, self.key) or self.per_token()
        return PerTokenGrams(self.grams.__getitem__, self.tokens)


class PerTokenGrams(Mapping):
    """module -> per-token Ĝ (float64) computed on each access from ``read(module)`` (raw sums)
    and the token counts: a consumer that goes module by module holds one module's matrices."""

    def __init__(self, read: Callable[[str], torch.Tensor], tokens: Mapping[str, int]):
        self._read, self.tokens = read, dict(tokens)

    def __getitem__(self, module: str) -> torch.Tensor:
        if module not in self.tokens:
            raise KeyError(module)
        return self._read(module).double() / max(self.tokens[module], 1)

    def __iter__(self) -> Iterator[str]:
        return iter(self.tokens)

    def __len__(self) -> int:
        return len(self.tokens)


# --- which data, which key -------------------------------------------------------------------


def _marker(adapter: Adapter) -> dict | None:
    path = adapter.path / MARKER
    if not path.is_file():
        return None
    try:
        marker = read_json(path)
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("kind") == "adapter" else None


def calibration_sources(
    adapter: Adapter,
    data: Sequence[str | Source] | None = None,
    split_seed: int | None = None,
) -> tuple[list[Source], dict]:
    """The sources whose train split calibrates ``adapter``, and the adapter's training config.

    ``data`` None: the adapter's own training data from its lorasum.json; refused (one line)
    for an adapter trained elsewhere.
    """
    marker = _marker(adapter)
    cfg = (marker or {}).get("config") or {}
    if data is None:
        if not cfg.get("data"):
            raise LorasumError(
                f"adapter {adapter.path} has no lorasum.json recording its training data "
                "(trained elsewhere?); pass calibration data for it (--calibration SOURCES)"
            )
        return [
            load_split(
                spec,
                cfg.get("split_seed", DEFAULT_SPLIT_SEED),
                cfg.get("question_field"),
                cfg.get("answer_field"),
                cfg.get("max_train"),
            )
            for spec in cfg["data"]
        ], cfg
    if isinstance(data, str | Source):
        data = [data]
    seed = split_seed if split_seed is not None else cfg.get("split_seed", DEFAULT_SPLIT_SEED)
    sources = [d if isinstance(d, Source) else load_split(d, seed) for d in data]
    if not sources:
        raise LorasumError(f"no calibration data given for adapter {adapter.path}")
    return sources, cfg


def _model_spec(adapter: Adapter, cfg: dict, model: str | nn.Module | None) -> str:
    if isinstance(model, str):
        return model
    spec = adapter.base_model or cfg.get("model")
    if spec is None and model is not None:
        spec = getattr(getattr(model, "config", None), "_name_or_path", None)
    if not spec:
        raise LorasumError(
            f"adapter {adapter.path} does not name its base model; pass the model (--model)"
        )
    return str(spec)


def calibration_key(
    adapter: Adapter | None, sources: Sequence[Source], model_spec: str, max_length: int, modules
) -> str:
    """What the statistics depend on: the base model, the data's train split, max_length and
    the modules — not the adapter (``adapter`` is accepted for the callers' convenience), so
    every adapter of a domain (each seed, each budget) shares one file."""
    return config_key(
        {
            "data": [{"origin": s.origin, "train": s.fingerprint()["train"]} for s in sources],
            "model": model_spec,
            "max_length": max_length,
            "modules": sorted(modules),
            "version": 2,  # of this file's statistics (1: keyed by the adapter's weights too)
        }
    )


def cache_dir() -> Path:
    """Where the statistics are cached: $LORASUM_HOME/calibration (shared by all studies)."""
    from lorasum.models.loading import lorasum_home

    return lorasum_home() / "calibration"


# --- streaming the statistics ----------------------------------------------------------------


def _module(model: nn.Module, name: str) -> nn.Module:
    module = model.get_submodule(name)
    return getattr(module, "base_layer", module)  # already LoRA-wrapped: the base layer's input


@torch.inference_mode()
def gram_statistics(
    model: nn.Module,
    batches: Sequence,
    modules: Sequence[str],
) -> tuple[dict[str, torch.Tensor], dict[str, int], dict[str, str]]:
    """Σ x xᵀ over non-padding tokens at the input of each named module, by forward hooks.

    Returns (grams, tokens, aliases): grams holds one float64 matrix per distinct input (a
    module that reads the same tensor as an earlier one is listed in aliases → that one).
    """
    device = next(model.parameters()).device
    grams: dict[str, torch.Tensor] = {}
    tokens: dict[str, int] = dict.fromkeys(modules, 0)
    aliases: dict[str, str] = {}
    state: dict = {"mask": None, "seen": {}}  # per batch: id(input) -> (input, first module)

    def hook(name: str):
        def fn(module, args, output):
            x = args[0]
            seen = state["seen"]
            if id(x) in seen:  # q/k/v read one tensor: one product, one stored matrix
                owner = seen[id(x)][1]
                if aliases.get(name, owner) != owner or name in grams:
                    raise RuntimeError(f"module {name} changed which input it shares")
                aliases[name] = owner
                tokens[name] = tokens[owner]
                return
            seen[id(x)] = (x, name)  # the reference keeps id(x) unique within the batch
            if name in aliases:
                raise RuntimeError(f"module {name} no longer shares the input of {aliases[name]}")
            rows = x.reshape(-1, x.shape[-1])[state["mask"]].double()  # (n, d_in)
            product = rows.T @ rows  # (d_in, d_in), float64
            if name in grams:
                grams[name] += product
            else:
                grams[name] = product
            tokens[name] += rows.shape[0]

        return fn

    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(hf, "base_model", hf)  # the transformer without the LM head
    handles = [_module(hf, m).register_forward_hook(hook(m)) for m in modules]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            batch = batch.to(device)
            state["mask"] = batch.attention_mask.reshape(-1).bool()  # (B·T,)
            state["seen"] = {}
            backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
            state["seen"] = {}
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    missing = [m for m in modules if m not in grams and m not in aliases]
    if missing:
        raise LorasumError(f"modules {missing[:3]} never ran in the forward pass; wrong model?")
    return {m: g.cpu() for m, g in grams.items()}, tokens, aliases


# --- the cache -------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _upper_flat(d: int) -> torch.Tensor:
    """Flat indices (row·d + col) of the upper triangle of a (d, d) matrix, row by row."""
    rows, cols = torch.triu_indices(d, d)
    return rows * d + cols


def pack_symmetric(G: torch.Tensor) -> torch.Tensor:
    """The upper triangle of a symmetric (d, d) matrix, row by row: (d(d+1)/2,)."""
    return G.contiguous().view(-1)[_upper_flat(G.shape[0])]


def unpack_symmetric(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_symmetric`; a 2-D tensor (a cache file written before packing) is
    returned as it is."""
    if packed.ndim == 2:
        return packed
    d = int((math.isqrt(8 * packed.numel() + 1) - 1) // 2)  # d(d+1)/2 = numel
    upper = torch.zeros(d * d, dtype=packed.dtype)
    upper[_upper_flat(d)] = packed
    upper = upper.view(d, d)
    G = upper + upper.T
    G.diagonal().sub_(upper.diagonal())
    return G


def _read_cache(path: Path, key: str) -> Calibration | None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["lorasum"])
        tensors = load_file(str(path))
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        log.warning("ignoring unreadable calibration cache %s (%s)", path, str(e)[:80])
        return None
    if meta.get("key") != key:
        return None
    owners: dict[str, torch.Tensor] = {}
    for m in meta["tokens"]:
        owner = meta["aliases"].get(m, m)
        if owner not in owners:
            owners[owner] = unpack_symmetric(tensors[f"gram.{owner}"]).double()
    grams = {m: owners[meta["aliases"].get(m, m)] for m in meta["tokens"]}
    return Calibration(
        grams=grams, tokens=meta["tokens"], key=key, path=path, info=meta["info"], computed=False
    )


def _file_grams(path: Path, key: str) -> PerTokenGrams | None:
    """The cache file's matrices as a `PerTokenGrams` that reads one module per access."""
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["lorasum"])
    except (OSError, ValueError, KeyError, SafetensorError):
        return None
    if meta.get("key") != key:
        return None

    def read(module: str) -> torch.Tensor:
        with safe_open(str(path), framework="pt") as f:
            owner = meta["aliases"].get(module, module)
            return unpack_symmetric(f.get_tensor(f"gram.{owner}"))

    return PerTokenGrams(read, meta["tokens"])


def _write_cache(path: Path, calibration: Calibration, aliases: dict[str, str]) -> None:
    """Atomically write the statistics (temp file + rename); an unwritable cache is skipped."""
    from safetensors.torch import save_file

    owners = {m: g for m, g in calibration.grams.items() if m not in aliases}
    meta = {
        "key": calibration.key,
        "tokens": calibration.tokens,
        "aliases": aliases,
        "info": calibration.info,
    }
    tensors = {f"gram.{m}": pack_symmetric(g.float()) for m, g in owners.items()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_beside(path)
    except OSError as e:
        log.warning("cannot cache calibration statistics in %s (%s)", path.parent, e)
        return
    try:
        save_file(tensors, tmp, metadata={"lorasum": json.dumps(meta)})
        os.chmod(tmp, 0o644)
        commit_temp(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# --- the entry points ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    """What one calibration reads and where its cache file is."""

    adapter: Adapter
    sources: list[Source]
    spec: str
    max_length: int
    modules: list[str]
    key: str

    @property
    def path(self) -> Path:
        return cache_dir() / f"{FILE_PREFIX}{self.key}.safetensors"

    def cached(self) -> Calibration | None:
        return _read_cache(self.path, self.key) if self.path.is_file() else None


def _plan(
    adapter: str | Path | Adapter,
    data: Sequence[str | Source] | None,
    model: str | nn.Module | None,
    model_spec: str | None,
    modules: Sequence[str] | None,
    max_length: int | None,
    split_seed: int | None,
) -> _Plan:
    adapter = adapter if isinstance(adapter, Adapter) else read_adapter(adapter)
    sources, cfg = calibration_sources(adapter, data, split_seed)
    spec = model_spec or _model_spec(adapter, cfg, model)
    max_length = max_length or cfg.get("max_length") or DEFAULT_MAX_LENGTH
    names = sorted(modules if modules is not None else adapter.modules)
    key = calibration_key(adapter, sources, spec, max_length, names)
    return _Plan(adapter, sources, spec, max_length, names, key)


def calibrate(
    adapter: str | Path | Adapter,
    data: Sequence[str | Source] | None = None,
    *,
    model: str | nn.Module | None = None,
    tokenizer=None,
    model_spec: str | None = None,
    modules: Sequence[str] | None = None,
    max_length: int | None = None,
    batch_size: int = EVAL_BATCH_SIZE,
    split_seed: int | None = None,
    device: str = RuntimeSettings.device,
    cache: bool = True,
) -> Calibration:
    """Input Gram matrices of ``adapter``'s domain at its modules (or ``modules``), cached.

    ``data``: sources whose train split is used (default: the adapter's own training data;
    ``split_seed`` default: the adapter's, else `DataSettings.split_seed`). ``model``: a spec
    (default: the adapter's base model) or a loaded model to reuse with its ``tokenizer``, run as it is (fp32
    recommended) with no adapter applied; ``model_spec`` names a loaded model in the cache key
    (default: the adapter's base model). ``max_length``: default the adapter's training
    max_length, else `DataSettings.max_length`. Padding and batch size do not change the result.
    """
    plan = _plan(adapter, data, model, model_spec, modules, max_length, split_seed)
    if cache:
        found = plan.cached()
        if found is not None:
            return found
    return _compute(plan, model, tokenizer, batch_size, device, cache)


def _compute(plan: _Plan, model, tokenizer, batch_size: int, device: str, cache: bool):
    from lorasum.data.token_cache import tokenize_cached
    from lorasum.models.loading import load_model, load_tokenizer
    from lorasum.models.precision import pick_device

    if tokenizer is None:
        tokenizer = load_tokenizer(plan.spec)
    if not isinstance(model, nn.Module):
        model = load_model(plan.spec, pick_device(device))
    check_fits(plan.adapter, model, plan.spec)
    for m in plan.modules:  # modules asked for beyond the adapter's own must exist too
        try:
            base = _module(model, m)
        except AttributeError:
            raise LorasumError(f"module {m} does not exist in model {plan.spec}") from None
        if delta_shape(base) is None:
            raise LorasumError(f"module {m} of model {plan.spec} is not a linear layer")
    items = tokenize_cached(tokenizer, plan.sources, "train", plan.max_length)
    batches = make_batches(items, batch_size, tokenizer.pad_token_id, shuffle=False)
    t0 = time.perf_counter()
    grams, tokens, aliases = gram_statistics(model, batches, plan.modules)
    info = {
        "data": {
            s.name: {"origin": s.origin, "train": s.fingerprint()["train"]} for s in plan.sources
        },
        "model": plan.spec,
        "max_length": plan.max_length,
        "rows": len(items),
        "tokens": next(iter(tokens.values()), 0),
        "seconds": time.perf_counter() - t0,
        "lorasum_version": __version__,
    }
    # rounded as they are stored, so a result does not depend on whether it came from the cache
    # (fp32, upper triangle mirrored: a float product XᵀX is not bitwise symmetric)
    stored = {m: unpack_symmetric(pack_symmetric(g.float())).double() for m, g in grams.items()}
    full = {m: stored[aliases.get(m, m)] for m in plan.modules}
    result = Calibration(grams=full, tokens=tokens, key=plan.key, info=info, computed=True)
    if cache:
        _write_cache(plan.path, result, aliases)
        result.path = plan.path if plan.path.is_file() else None
    return result


def calibrate_adapters(
    adapters: Sequence[str | Path | Adapter],
    data: Sequence[Sequence[str | Source] | None] | None = None,
    *,
    model: str | None = None,
    modules: Sequence[str] | None = None,
    max_length: int | None = None,
    batch_size: int = EVAL_BATCH_SIZE,
    device: str = RuntimeSettings.device,
) -> list[Calibration]:
    """`calibrate` for several adapters; the model is loaded once, and only on a cache miss.

    ``data``: one entry per adapter (None = that adapter's own training data).
    """
    if data is None:
        data = [None] * len(adapters)
    if len(data) != len(adapters):
        raise LorasumError(
            f"--calibration has {len(data)} entries for {len(adapters)} adapters; give one each "
            "('own' = the adapter's training data)"
        )
    plans = [
        _plan(a, d, model, None, modules, max_length, None)
        for a, d in zip(adapters, data, strict=True)
    ]
    out = [p.cached() for p in plans]
    loaded: dict[str, tuple] = {}  # spec -> (model, tokenizer)
    for i, plan in enumerate(plans):
        if out[i] is not None:
            continue
        if plan.spec not in loaded:
            from lorasum.models.loading import load_model, load_tokenizer
            from lorasum.models.precision import pick_device

            loaded[plan.spec] = (
                load_model(plan.spec, pick_device(device)),
                load_tokenizer(plan.spec),
            )
        net, tok = loaded[plan.spec]
        out[i] = _compute(plan, net, tok, batch_size, device, cache=True)
    return out


def calibration_keys(
    adapters: Sequence[str | Path | Adapter],
    data: Sequence[Sequence[str | Source] | None] | None = None,
    *,
    model: str | None = None,
    modules: Sequence[str] | None = None,
    max_length: int | None = None,
) -> list[str]:
    """The cache keys `calibrate_adapters` would use, without computing anything."""
    if data is None:
        data = [None] * len(adapters)
    return [
        _plan(a, d, model, None, modules, max_length, None).key
        for a, d in zip(adapters, data, strict=True)
    ]


OWN = ("own", "-")  # a --calibration entry meaning "this adapter's own training data"


def parse_calibration(
    entries: Sequence[str | Sequence[str] | None] | str | None, n: int
) -> list[list[str] | None] | None:
    """--calibration values → one source list per adapter (None = its own training data).

    Each entry is a comma list of sources (builtin, .jsonl/.csv, hf:id) or 'own'.
    """
    if entries is None:
        return None
    if isinstance(entries, str):
        entries = [entries]
    out: list[list[str] | None] = []
    for entry in entries:
        if entry is None or (isinstance(entry, str) and entry.strip() in OWN):
            out.append(None)
            continue
        items = entry.split(",") if isinstance(entry, str) else list(entry)
        items = [str(s).strip() for s in items if str(s).strip()]
        if not items:
            raise LorasumError(f"--calibration entry {entry!r} names no data source")
        out.append(items)
    if len(out) != n:
        raise LorasumError(
            f"--calibration has {len(out)} entries for {n} adapters; give one each "
            "(a comma list of sources, or 'own' for the adapter's training data)"
        )
    return out
