"""Mean gradients of a domain's loss at the base model's targeted weights: predictors that need
no adapter.

For a domain d with training rows and a targeted module m (weight W, ``nn.Linear`` orientation
d_out×d_in), the mean gradient of the base model's answer-only loss is

    G_d,m = (1/n_d) Σ_t δ_t x_tᵀ   (d_out, d_in)

over every position t of the domain's batches (x_t the module's input, δ_t = ∂(Σ NLL)/∂y_t the
gradient of the summed answer-token NLL at the module's output; n_d = the number of counted
answer tokens). Positions that no counted token depends on (padding) have δ_t = 0 exactly, so
G is the gradient of the token-weighted mean NLL, what ``loss.backward()`` would leave in
``W.grad`` (transposed for GPT-2's Conv1D). Domains i, j are compared per module by the cosine
⟨G_i, G_j⟩_F / ‖G_i‖‖G_j‖ (float64 inner products), aggregated over modules as the RMS (like
the paper's RMS cosine of the adapters' ΔW), the mean (keeps the sign: conflicting gradients
are negative) and the global cosine of the concatenated gradients.

How it is computed (factored, memory-bounded):

- **no weight gradient is ever requested.** Every parameter is frozen for the pass; the input
  embedding's output is made to require grad, so backward computes activation gradients only.
  A forward hook keeps each targeted module's input x and registers a hook on its output that
  receives δ; each batch adds one GEMM δᵀ x (fp32) into the module's sum;
- **module groups**: the targeted modules are split into groups whose fp32 sums fit
  ``max_bytes``; each group takes one forward+backward pass over the domain's batches. The
  grouping changes nothing in the arithmetic of a module's sum (hooks do not change the graph);
- **cache per domain**: ``<cache_dir>/grad-<key>/`` holds one safetensors file per group (G in
  fp32, d_out×d_in per module; ~210 MB for SmolLM2-135M's q/k/v/o/down over 30 layers) and
  ``lorasum.json`` written last (atomic directory). The key hashes the model spec, the
  domain's train rows (origin + fingerprint), max_length and the module list. Keeping G itself,
  not only the inner products, lets a domain computed once be compared with any domain later;
  `gradient_cosines` reads one module of every domain at a time (N × one module in memory).
  A freshly computed G is used as stored (fp32), so results do not depend on the cache.
- **a study's copy**: `place_gradients` copies a domain's files into another directory of
  the same format, under the key of whoever places them; `read_gradients` reads either. A
  study keeps each domain's statistics in its own directory (`lorasum.study.tasks.gradients`),
  on the storage its nodes share.

The same passes give each domain's base loss (mean answer-token NLL of the base model on its
training rows), another adapter-free predictor.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lorasum._version import __version__
from lorasum.data.sources import Source
from lorasum.data.tokenize import Batch
from lorasum.errors import LorasumError
from lorasum.settings import LoraSettings

DEFAULT_MAX_BYTES = 256 * 2**20
# rows per forward+backward: the result is a sum, so only memory depends on it (SmolLM2-135M,
# 64 tokens: peak RSS 3.7 GB at 16 rows, 1.9 GB at 4, the same seconds; see
# benchmarks/gradient_predictors.py)
DEFAULT_BATCH_SIZE = 4
FILE_PREFIX = "grad-"
# of this file's statistics: in the cache's key and a study's gradients units' (the unit that
# compares them keeps its older key and sees a new definition through the lorasum version)
STATISTICS_VERSION = 1
_ACC = torch.float64


@dataclass
class DomainGradients:
    """One domain's mean gradient per module (in memory or in a cache directory) and base loss."""

    modules: list[str]
    files: dict[str, Path | None]  # module -> safetensors file holding it (None: in memory)
    tokens: int  # counted answer tokens n_d
    loss: float  # mean NLL per counted token of the base model on the train rows
    key: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # in memory (no cache)
    info: dict = field(default_factory=dict)
    computed: bool = False  # True when this call ran the model

    def gradient(self, module: str) -> torch.Tensor:
        """G of one module, (d_out, d_in) fp32."""
        if module in self.tensors:
            return self.tensors[module]
        from safetensors import safe_open

        with safe_open(str(self.files[module]), framework="pt") as f:
            return f.get_tensor(module)


# --- which modules, which groups -------------------------------------------------------------


def target_module_names(
    model: nn.Module, target_modules: str | Sequence[str] = LoraSettings.target_modules
):
    """Full names of the linear modules the adapters would target (`resolve_target_modules`'
    suffixes, or full names), in model order, with their (d_out, d_in)."""
    from lorasum.adapters import delta_shape
    from lorasum.models.loading import resolve_target_modules

    suffixes = resolve_target_modules(
        model, target_modules if isinstance(target_modules, str) else list(target_modules)
    )
    shapes: dict[str, tuple[int, int]] = {}
    for name, module in model.named_modules():
        if any(name == s or name.endswith("." + s) for s in suffixes):
            shape = delta_shape(module)
            if shape is not None:
                shapes[name] = shape
    return shapes


def module_groups(shapes: Mapping[str, tuple[int, int]], max_bytes: int) -> list[list[str]]:
    """Consecutive modules packed into groups whose fp32 d_out×d_in sums fit ``max_bytes`` (a
    module larger than that is a group of its own)."""
    groups: list[list[str]] = []
    size = 0
    for name, (d_out, d_in) in shapes.items():
        need = 4 * d_out * d_in
        if not groups or size + need > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += need
    return groups


# --- one pass: the gradient sums of one group ------------------------------------------------


@contextlib.contextmanager
def _frozen_with_input_grad(model: nn.Module):
    """Every parameter frozen, the input embedding's output requiring grad (so backward runs
    through the network and computes activation gradients only); restored afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)

    def grad_output(module, args, output):
        return output.requires_grad_(True)

    handle = model.get_input_embeddings().register_forward_hook(grad_output)
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        handle.remove()
        model.train(was_training)
        for p, flag in flags:
            p.requires_grad_(flag)


def gradient_sums(
    model: nn.Module, batches: Sequence[Batch], modules: Sequence[str]
) -> tuple[dict[str, torch.Tensor], int, float]:
    """Σ δ_t x_tᵀ per module (fp32, (d_out, d_in)) over the batches, with the number of counted
    tokens and the summed NLL (float64): one forward+backward of the summed answer NLL per
    batch, by hooks; no weight gradient is computed."""
    from lorasum.evaluate import token_nll, unwrap

    hf = unwrap(model)
    device = next(model.parameters()).device
    sums: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def forward(module, args, output):
            x = args[0].detach()  # (B, T, d_in)

            def backward(delta):  # (B, T, d_out) = ∂(Σ NLL)/∂y
                d = delta.reshape(-1, delta.shape[-1]).float()  # (N, d_out)
                product = d.T @ x.reshape(-1, x.shape[-1]).float()  # (d_out, d_in)
                if name in sums:
                    sums[name] += product
                else:
                    sums[name] = product

            if output.requires_grad:
                output.register_hook(backward)

        return forward

    handles = [hf.get_submodule(m).register_forward_hook(hook(m)) for m in modules]
    tokens, nll = 0, 0.0
    try:
        with _frozen_with_input_grad(hf), torch.enable_grad():
            for batch in batches:
                per_row, counts = token_nll(hf, batch.to(device))  # (B,), (B,)
                loss = per_row.sum()
                if counts.sum() > 0:
                    loss.backward()
                tokens += int(counts.sum())
                nll += float(loss.detach().double())
    finally:
        for h in handles:
            h.remove()
    missing = [m for m in modules if m not in sums]
    if missing and tokens > 0:
        raise LorasumError(f"modules {missing[:3]} got no gradient; wrong model or modules?")
    return {m: s.cpu() for m, s in sums.items()}, tokens, nll


# --- the statistics of one domain, cached ----------------------------------------------------


def gradient_key(source: Source, model_spec: str, max_length: int, modules: Sequence[str]) -> str:
    from lorasum.io import config_key

    return config_key(
        {
            "data": {"origin": source.origin, "train": source.fingerprint()["train"]},
            "model": model_spec,
            "max_length": max_length,
            "modules": sorted(modules),
            "loss": "answer-only token-weighted NLL",
            "version": STATISTICS_VERSION,
        }
    )


def read_gradients(path: Path, key: str) -> DomainGradients | None:
    """The statistics in ``path`` (a cache or a study's directory) when its marker holds
    ``key`` and every file is there, else None."""
    from lorasum.io import MARKER, read_json

    try:
        meta = read_json(path / MARKER)
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("key") != key:
        return None
    files = {m: path / f for m, f in meta["files"].items()}
    if not all(f.is_file() for f in files.values()):
        return None
    return DomainGradients(
        modules=list(meta["modules"]),
        files=files,
        tokens=meta["tokens"],
        loss=meta["loss"],
        key=key,
        info=meta["info"],
    )


def domain_gradients(
    model: nn.Module,
    tokenizer,
    source: Source,
    max_length: int,
    shapes: Mapping[str, tuple[int, int]],
    *,
    model_spec: str,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_bytes: int = DEFAULT_MAX_BYTES,
    cache_dir: str | Path | None = None,
    cache: bool = True,
) -> DomainGradients:
    """G per module (``shapes``: full module names from `target_module_names`) and the base
    loss of one domain's train split, cached under ``cache_dir`` (default
    ``$LORASUM_HOME/gradients``); ``cache`` False keeps every G in memory instead. The batch
    size changes memory only (padding has δ = 0)."""
    from lorasum.data.token_cache import tokenize_cached
    from lorasum.data.tokenize import make_batches
    from lorasum.io import MARKER, atomic_dir, write_json
    from lorasum.models.loading import lorasum_home

    if max_bytes < 1:
        raise LorasumError(f"max_bytes {max_bytes}: give a positive memory budget")
    modules = list(shapes)
    key = gradient_key(source, model_spec, max_length, modules)
    path = Path(cache_dir or lorasum_home() / "gradients") / f"{FILE_PREFIX}{key}"
    if cache:
        found = read_gradients(path, key)
        if found is not None:
            return found
    items = tokenize_cached(tokenizer, [source], "train", max_length)
    batches = make_batches(items, batch_size, tokenizer.pad_token_id, shuffle=False)
    groups = module_groups(shapes, max_bytes)
    t0 = time.perf_counter()
    out = DomainGradients(modules, {}, 0, math.nan, key, computed=True)
    with contextlib.ExitStack() as stack:
        tmp = None
        if cache:  # a temp directory renamed to `path` when every file is written
            tmp = stack.enter_context(atomic_dir(path))
        for k, group in enumerate(groups):
            sums, tokens, nll = gradient_sums(model, batches, group)
            if tokens == 0:
                raise LorasumError(f"the train split of {source.name} has no answer tokens")
            means = {m: sums[m] / tokens for m in group}  # (d_out, d_in) fp32
            out.tokens, out.loss = tokens, nll / tokens
            if tmp is None:
                out.tensors.update(means)
                out.files.update(dict.fromkeys(group))
            else:
                from safetensors.torch import save_file

                name = f"group-{k}.safetensors"
                save_file({m: g.contiguous() for m, g in means.items()}, str(tmp / name))
                out.files.update(dict.fromkeys(group, path / name))
            del sums, means
        out.info = {
            "data": {"origin": source.origin, "train": source.fingerprint()["train"]},
            "model": model_spec,
            "max_length": max_length,
            "rows": len(items),
            "groups": len(groups),
            "seconds": time.perf_counter() - t0,
            "lorasum_version": __version__,
        }
        if tmp is not None:
            write_json(tmp / MARKER, _meta(out, path))  # last: a directory with it is complete
    return out


def _meta(out: DomainGradients, path: Path) -> dict:
    return {
        "kind": "gradients",
        "key": out.key,
        "modules": out.modules,
        "files": {m: str(f.relative_to(path)) for m, f in out.files.items()},
        "tokens": out.tokens,
        "loss": out.loss,
        "info": out.info,
    }


def place_gradients(found: DomainGradients, dest: Path, key: str) -> DomainGradients:
    """``found``'s files (statistics held in a cache directory) copied into ``dest``
    atomically, its marker written with ``key`` (and ``found``'s own key as
    ``info.gradient_key``): the same statistics, now read from ``dest``. Copies, not hard
    links: damage to one copy (which a study's ledger detects and recomputes) must not reach
    the other."""
    import shutil

    from lorasum.io import MARKER, atomic_dir, write_json

    if any(f is None for f in found.files.values()):
        raise ValueError("place_gradients needs statistics held in files (cache=True)")
    dest = Path(dest)
    sources = {f.name: f for f in found.files.values()}  # group file name -> the cached file
    placed = DomainGradients(
        modules=found.modules,
        files={m: dest / f.name for m, f in found.files.items()},
        tokens=found.tokens,
        loss=found.loss,
        key=key,
        info={**found.info, "gradient_key": found.key},
        computed=found.computed,
    )
    with atomic_dir(dest) as tmp:
        for name, src in sources.items():
            shutil.copyfile(src, tmp / name)
        write_json(tmp / MARKER, _meta(placed, dest))  # last: a directory with it is complete
    return placed


# --- comparing domains -----------------------------------------------------------------------


def cosine_matrix(gram: torch.Tensor) -> torch.Tensor:
    """(N, N) cosines from a float64 Gram matrix of N vectors; 0 where a vector is zero."""
    norms = gram.diagonal().clamp_min(0).sqrt()  # (N,)
    outer = norms[:, None] * norms[None, :]  # (N, N)
    cos = torch.where(outer > 0, gram / outer.where(outer > 0, 1.0), 0.0)
    return cos.clamp(-1.0, 1.0)


def module_grams(domains: Sequence[DomainGradients], modules: Sequence[str]):
    """module -> (N, N) float64 Gram ⟨G_i, G_j⟩_F, one module of every domain in memory at a
    time."""
    out = {}
    for m in modules:
        flat = torch.stack([d.gradient(m).reshape(-1) for d in domains]).to(_ACC)  # (N, P)
        out[m] = flat @ flat.T  # (N, N)
    return out


def gradient_cosines(domains: Mapping[str, DomainGradients]) -> dict:
    """Pairwise gradient cosines of named domains (every domain over the same modules).

    Returns ``names``; N×N lists ``rms`` (RMS over modules of the per-module cosine), ``mean``
    (mean over modules) and ``global`` (cosine of the concatenated gradients, Σ_m ⟨G_i,G_j⟩ /
    √(Σ_m ‖G_i‖² Σ_m ‖G_j‖²)); ``modules``: module -> N×N per-module cosines; ``loss``: name ->
    base loss.
    """
    names = list(domains)
    modules = domains[names[0]].modules if names else []
    for n in names:
        if domains[n].modules != modules:
            raise LorasumError(
                f"domain {n}'s gradients cover other modules than {names[0]}'s; compute them "
                "with the same target modules"
            )
    grams = module_grams([domains[n] for n in names], modules)
    per_module = torch.stack([cosine_matrix(g) for g in grams.values()])  # (M, N, N)
    total = torch.stack(list(grams.values())).sum(0)  # (N, N)
    return {
        "names": names,
        "rms": per_module.square().mean(0).sqrt().tolist(),
        "mean": per_module.mean(0).tolist(),
        "global": cosine_matrix(total).tolist(),
        "modules": {m: c.tolist() for m, c in zip(modules, per_module, strict=True)},
        "loss": {n: domains[n].loss for n in names},
        "tokens": {n: domains[n].tokens for n in names},
    }
