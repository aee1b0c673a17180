"""Train one LoRA adapter on one or more QA sources (several = the merged-data baseline)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from lorasum._version import __version__
from lorasum.data.sources import Source
from lorasum.data.split import load_configured_split
from lorasum.data.token_cache import tokenize_cached
from lorasum.data.tokenize import Batch, check_answers_fit, collate, make_batches
from lorasum.errors import LorasumError
from lorasum.evaluate import autocast_context, evaluate_batches, perplexity_from, token_nll
from lorasum.io import atomic_dir, check_output_dir, config_key, read_json
from lorasum.models.loading import load_model, load_tokenizer, resolve_target_modules, uses_conv1d
from lorasum.models.precision import (
    autocast_dtype,
    frozen_linears_as,
    pick_device,
    precision_name,
    resolve_precision,
)
from lorasum.settings import SCHEDULES, TrainConfig
from lorasum.training.distributed import (
    World,
    process_group,
    rank_device,
    rank_rows,
    world_from_env,
)
from lorasum.training.lora_a import apply_lora_a
from lorasum.training.low_memory import fp32_attention_backward, lean
from lorasum.training.schedule import patience_stop, schedule_steps, val_rows_problem

log = logging.getLogger(__name__)


def load_sources(cfg: TrainConfig) -> list[Source]:
    return [load_configured_split(spec, cfg) for spec in cfg.data]


def adapter_key(cfg: TrainConfig, sources: list[Source]) -> str:
    """Hash of what determines the trained weights (and the reported val metric, if any)."""
    identity = cfg.identity()
    splits = ("train", "val") if cfg.uses_val() else ("train",)
    if not cfg.uses_val():
        identity.pop("max_eval")  # only decides which val/test rows exist
    data = []
    for s in sources:
        fp = s.fingerprint()
        data.append({"origin": fp["origin"], **{k: fp[k] for k in splits}})
    return config_key(
        {"config": identity, "data": data, "eval_val": cfg.eval_val, "version": __version__}
    )


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def diverged_dir(out: Path) -> Path:
    """Where a diverged training keeps its last good weights: ``<out>.diverged`` beside ``out``."""
    return out.with_name(out.name + ".diverged")


def _diverged(
    peft_model, out: Path, step: int, what: str, log_rows: list[dict], cfg, write: bool = True
) -> None:
    """Keep the weights before the non-finite step for inspection, then stop with one line.

    Under torchrun every rank sees the same global loss and gradient norm, so all stop here;
    only rank 0 (``write``) keeps the weights."""
    keep = diverged_dir(out)
    kept = ""
    if write and (not keep.exists() or (existing_kind(keep) == "diverged")):
        marker = {
            "kind": "diverged",
            "key": None,
            "lorasum_version": __version__,
            "config": asdict(cfg),
            "step": step,
            "problem": what,
            "note": f"LoRA weights after step {step - 1}, the last finite one; not a result",
        }
        with atomic_dir(keep, marker=marker) as tmp:
            peft_model.save_pretrained(str(tmp))
            with open(tmp / "train_log.jsonl", "w") as f:
                for row in log_rows:
                    f.write(json.dumps(row) + "\n")
        kept = f"; the last good weights (after step {step - 1}) are kept in {keep}"
    raise LorasumError(
        f"training diverged at step {step} ({what}); nothing was written to {out}{kept}; "
        "lower --lr or use --precision fp32"
    )


def existing_kind(path: Path) -> str | None:
    try:
        return read_json(path / "lorasum.json").get("kind")
    except (OSError, ValueError, AttributeError):
        return None


def validation_loss(model: nn.Module, batches, names, device, amp) -> float:
    """Token-weighted mean NLL on the validation batches (counted tokens): what early stopping
    watches. The training loop calls it through this module, so tests can script it."""
    result = evaluate_batches(model, batches, names, device, amp)
    return result["nll"] / max(result["tokens"], 1)


def lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the trainable (LoRA) weights; consumes no random numbers."""
    return {
        n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad
    }


@torch.no_grad()
def load_lora_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    for n, p in model.named_parameters():
        if n in state:
            p.copy_(state[n])


@dataclass
class _Run:
    """One training run's moving parts and running totals."""

    cfg: TrainConfig
    peft_model: nn.Module
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: object
    device: torch.device
    amp: torch.dtype | None
    train_rows: int
    forward: (
        object  # batch -> (row NLL (B,), row counted tokens (B,)); through DDP on several ranks
    )
    world: World = field(default_factory=World)
    step: int = 0
    real_tokens: int = 0  # every non-padding token processed (prompt + answer)
    answer_tokens: int = 0  # tokens in the loss
    log_rows: list[dict] = field(default_factory=list)

    @property
    def epochs(self) -> float:
        """Passes over the training rows so far (steps × batch size / rows)."""
        return self.step * self.cfg.batch_size / self.train_rows

    def point(self) -> dict:
        return {
            "step": self.step,
            "epoch": self.epochs,
            "real_tokens": self.real_tokens,
            "answer_tokens": self.answer_tokens,
        }


def _attach_lora(model: nn.Module, cfg: TrainConfig, targets: list[str]) -> nn.Module:
    """Seed, then wrap ``model`` in fresh LoRA layers (PEFT's init draws from the seed)."""
    from peft import LoraConfig, get_peft_model

    _seed_everything(cfg.seed)
    lora_config = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        fan_in_fan_out=uses_conv1d(model, targets),
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lora_config)
    peft_model.peft_config["default"].base_model_name_or_path = cfg.model
    try:
        apply_lora_a(peft_model, cfg.lora_a, cfg.a_slot, cfg.a_seed)
    except BaseException:
        peft_model.unload()  # the shared model is left as it came
        raise
    return peft_model


class _TokenNll(nn.Module):
    """``token_nll`` as a module's forward, so DistributedDataParallel can wrap it (DDP reduces
    the gradients of whatever its own forward ran; ``token_nll`` may bypass the model's)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, counted, dataset):
        return token_nll(self.model, Batch(input_ids, attention_mask, counted, dataset))


def _forward(peft_model: nn.Module, world: World, device: torch.device):
    """batch -> (row NLL, row tokens); on several ranks through DDP, which sums (averages) the
    LoRA gradients over the ranks in the backward."""
    if not world.distributed:
        return lambda batch: token_nll(peft_model, batch)
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(
        _TokenNll(peft_model),
        device_ids=[device.index] if device.type == "cuda" else None,
        broadcast_buffers=False,  # the frozen base's buffers are the same on every rank
    )
    return lambda b: ddp(b.input_ids, b.attention_mask, b.counted, b.dataset)


def _start_run(
    peft_model, cfg: TrainConfig, total_steps: int, amp, train_rows: int, world: World
) -> _Run:
    """AdamW over the LoRA weights with linear warmup, then ``cfg.schedule`` over
    ``total_steps``."""
    from transformers import get_scheduler

    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_scheduler(
        SCHEDULES[cfg.schedule],
        optimizer,
        num_warmup_steps=min(cfg.warmup_steps, total_steps),
        num_training_steps=total_steps,
    )
    device = next(peft_model.parameters()).device
    forward = _forward(peft_model, world, device)
    return _Run(
        cfg, peft_model, params, optimizer, scheduler, device, amp, train_rows, forward, world
    )


def _step_loss(run: _Run, batch: Batch, row_nll, row_tokens, empty: bool):
    """(loss to backpropagate, the global batch's loss, counted tokens, real tokens, positions).

    The loss is the summed answer-token NLL over the global batch's counted tokens. On several
    ranks each backpropagates its own sum over the global count, times the world size because
    DDP averages the ranks' gradients: the reduced gradient is one process's. A rank without
    rows (``empty``: it ran a stand-in row to join the reduction) backpropagates zero.
    """
    world = run.world
    if not world.distributed:
        n_tokens = int(row_tokens.sum())
        loss = row_nll.sum() / max(n_tokens, 1)  # token-weighted mean over the batch
        real, positions = int(batch.attention_mask.sum()), batch.input_ids.numel()
        return loss, float(loss.detach()), n_tokens, real, positions
    local = (
        [0.0] * 4
        if empty
        else [
            float(row_nll.detach().sum()),
            int(row_tokens.sum()),
            int(batch.attention_mask.sum()),
            batch.input_ids.numel(),
        ]
    )
    nll, n_tokens, real, positions = world.sum(local, run.device)
    n_tokens, real, positions = int(n_tokens), int(real), int(positions)
    scale = 0.0 if empty else float(world.size)
    loss = row_nll.sum() * scale / max(n_tokens, 1)
    return loss, nll / max(n_tokens, 1), n_tokens, real, positions


def _optimizer_step(run: _Run, batch, epoch: int, out: Path, empty: bool = False) -> float:
    """Forward, backward, clip and update on one batch (this rank's share of the global batch
    under torchrun); log it; return the global batch's loss."""
    cfg, model = run.cfg, run.peft_model
    t_step = time.perf_counter()
    batch = batch.to(run.device)
    with autocast_context(run.device, run.amp):
        row_nll, row_tokens = run.forward(batch)
    loss, loss_value, n_tokens, real_tokens, positions = _step_loss(
        run, batch, row_nll, row_tokens, empty
    )
    write = run.world.is_main
    if not math.isfinite(loss_value):  # checked before any update: weights are good
        _diverged(model, out, run.step + 1, f"loss {loss_value}", run.log_rows, cfg, write)
    loss.backward()  # under DDP the gradients are reduced over the ranks here
    grad_norm = (
        torch.nn.utils.clip_grad_norm_(run.params, cfg.grad_clip)
        if cfg.grad_clip > 0
        else torch.tensor(float("nan"))
    )
    if cfg.grad_clip > 0 and not math.isfinite(float(grad_norm)):
        what = f"gradient norm {float(grad_norm)}"
        _diverged(model, out, run.step + 1, what, run.log_rows, cfg, write)
    step_lr = run.scheduler.get_last_lr()[0]  # the rate this step used
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    run.real_tokens += real_tokens
    run.answer_tokens += n_tokens
    run.log_rows.append(
        {
            "step": run.step,
            "epoch": epoch,
            "loss": loss_value,
            "lr": step_lr,
            "grad_norm": float(grad_norm),
            "tokens": n_tokens,
            "real_tokens": real_tokens,
            "positions": positions,  # computed, padding included (summed over ranks)
            "seconds": time.perf_counter() - t_step,
        }
    )
    return loss_value


@dataclass
class _Watch:
    """What happens between optimizer steps: snapshots, validation and early stopping."""

    snapshot_steps: list[int]
    eval_every: int
    patience: int
    last_step: int  # the run's last step is evaluated too
    validate: object  # () -> validation loss of the current weights; None without --eval-every
    snapshots: list[dict] = field(default_factory=list)  # point + "state"
    curve: list[dict] = field(default_factory=list)  # point + val_loss, val_perplexity
    best_state: dict | None = None
    best_index: int | None = None
    stopped_early: bool = False

    def after_step(self, run: _Run) -> bool:
        """Take what is due at ``run.step``; True when the run should stop here."""
        if run.step in self.snapshot_steps:
            self.snapshots.append({**run.point(), "state": lora_state(run.peft_model)})
        due = run.step % self.eval_every == 0 or run.step == self.last_step
        if self.validate is None or not due:
            return False
        loss = float(self.validate())
        self.curve.append(
            {**run.point(), "val_loss": loss, "val_perplexity": perplexity_from(loss, 1)}
        )
        best, stop = patience_stop([p["val_loss"] for p in self.curve], self.patience)
        if best == len(self.curve) - 1:
            self.best_state, self.best_index = lora_state(run.peft_model), best
        self.stopped_early = stop is not None and run.step < self.last_step
        return stop is not None


def _rank_batches(run: _Run, train_items, pad_id: int, seed: int):
    """(batch, empty) per global batch of one pass: the global batches themselves in one
    process; under torchrun this rank's rows of each (``rank_rows``), the same global batches in
    the same order. A rank with no rows in a batch gets its first row as a stand-in, ``empty``."""
    bs, world = run.cfg.batch_size, run.world
    if not world.distributed:
        batches = make_batches(train_items, bs, pad_id, shuffle=True, seed=seed)
        return ((b, False) for b in batches)
    groups = make_batches(train_items, bs, pad_id, shuffle=True, seed=seed, lazy=True).groups
    shares = ((g, rank_rows(g, world.rank, world.size)) for g in groups)
    return (
        (collate([train_items[i] for i in (rows or g[:1])], pad_id), not rows) for g, rows in shares
    )


def _run_epochs(run: _Run, watch: _Watch, train_items, pad_id: int, out: Path, bar) -> None:
    """Optimizer steps over reshuffled passes of the rows until the last step or a stop."""
    epoch = 0
    while run.step < watch.last_step:
        batches = _rank_batches(run, train_items, pad_id, run.cfg.seed + epoch)
        for batch, empty in batches:
            if run.step >= watch.last_step:
                break
            loss_value = _optimizer_step(run, batch, epoch, out, empty)
            bar.set_postfix(loss=f"{loss_value:.3f}")
            bar.update(1)
            if watch.after_step(run):
                return
        epoch += 1


def _val_batches(cfg: TrainConfig, tokenizer, sources: list[Source]) -> list | None:
    if not any(s.splits["val"] for s in sources):
        return None
    items = tokenize_cached(tokenizer, sources, "val", cfg.max_length, cfg.answer_only)
    return make_batches(items, cfg.batch_size, tokenizer.pad_token_id, shuffle=False)


def _metrics(run: _Run, watch: _Watch, total_steps: int, seconds: float) -> dict:
    rows = run.log_rows
    best = watch.curve[watch.best_index] if watch.best_index is not None else None
    return {
        "steps": run.step,  # optimizer steps taken
        "schedule_steps": total_steps,  # the LR schedule's length
        "best_step": best["step"] if best else None,  # the weights kept (--eval-every)
        "epochs": run.epochs,
        "train_rows": run.train_rows,
        "real_tokens": run.real_tokens,
        "answer_tokens": run.answer_tokens,
        "val_curve": watch.curve,
        "stopped_early": watch.stopped_early,  # by the patience rule, before the cap
        "stop_step": run.step,  # the step the run ended at (= steps)
        "stopped_by": _stopped_by(run.cfg, watch),
        "schedule": run.cfg.schedule,
        "final_loss": sum(r["loss"] for r in rows[-10:]) / len(rows[-10:]),
        "first_loss": rows[0]["loss"],
        "seconds": seconds,
        "tokens_per_second": run.real_tokens / seconds if seconds > 0 else None,
        "precision": precision_name(run.amp),
        "device": str(run.device),
    }


def _stopped_by(cfg: TrainConfig, watch: _Watch) -> str:
    """What ended the run: the patience rule, --stop-at, or the cap (the schedule's length:
    --max-epochs under --eval-every, else --epochs/--max-steps)."""
    if watch.stopped_early:
        return "patience"
    return "stop_at" if cfg.stop_at else "cap"


def _final_val(run: _Run, watch: _Watch, val_batches, names, progress: bool) -> dict:
    """Put the weights to keep in place and report their val perplexity (if one is wanted):
    the best evaluation's weights and number under --eval-every, else the last weights'."""
    if watch.best_state is not None:
        load_lora_state(run.peft_model, watch.best_state)
        return {"val_perplexity": watch.curve[watch.best_index]["val_perplexity"]}
    if run.cfg.eval_val and val_batches is not None:
        val = evaluate_batches(
            run.peft_model, val_batches, names, run.device, run.amp, progress=progress, desc="val"
        )
        return {"val_perplexity": val["perplexity"]}
    return {}


def snapshot_key(cfg: TrainConfig, sources: list[Source], step: int) -> str:
    """A snapshot's own key: what its weights depend on (not the other snapshots' steps)."""
    weights_key = adapter_key(replace(cfg, snapshots=[], eval_val=False), sources)
    return config_key({"snapshot_of": weights_key, "step": step})


def _save(out: Path, marker: dict, run: _Run, watch: _Watch, sources: list[Source]) -> None:
    """The adapter (+ train_log.jsonl, + snapshots/step-<N>/) into ``out``, atomically."""
    val_rows = [
        {k: p[k] for k in ("step", "epoch", "val_loss", "val_perplexity")} for p in watch.curve
    ]
    log_rows = sorted(
        run.log_rows + val_rows,
        key=lambda r: (r["step"], "val_loss" in r),
    )
    with atomic_dir(out, marker=marker) as tmp:
        run.peft_model.save_pretrained(str(tmp))
        with open(tmp / "train_log.jsonl", "w") as f:
            for row in log_rows:
                f.write(json.dumps(row) + "\n")
        if not watch.snapshots:
            return
        kept = lora_state(run.peft_model)
        for snap in watch.snapshots:
            point = {k: v for k, v in snap.items() if k != "state"}
            snap_marker = {
                "kind": "snapshot",
                "key": snapshot_key(run.cfg, sources, point["step"]),
                "parent": marker["key"],
                **point,
                **{k: marker[k] for k in ("lorasum_version", "config", "target_modules", "data")},
            }
            load_lora_state(run.peft_model, snap["state"])
            with atomic_dir(tmp / "snapshots" / f"step-{point['step']}", snap_marker) as snap_tmp:
                run.peft_model.save_pretrained(str(snap_tmp))
        load_lora_state(run.peft_model, kept)


def train(
    cfg: TrainConfig,
    out: str | Path,
    *,
    overwrite: bool = False,
    model: nn.Module | None = None,
    tokenizer=None,
    sources: list[Source] | None = None,
    progress: bool = True,
) -> dict:
    """Train a LoRA adapter and write it to ``out`` in PEFT format; return its lorasum.json.

    A finished adapter with the same config and data in ``out`` is reused, not retrained.
    ``model``/``tokenizer`` may be passed to share one loaded base model across trainings; the
    model is left unchanged (LoRA layers are removed again). With ``cfg.snapshots`` the adapter
    at those steps is saved too, in ``out/snapshots/step-<N>/``; with ``cfg.eval_every`` the
    run stops by the patience rule and the weights of the lowest validation loss are saved.

    Under torchrun (``WORLD_SIZE`` > 1) the processes train one adapter together: each takes
    its share of every global batch of ``cfg.batch_size`` rows, DDP reduces the gradients, and
    rank 0 alone writes; every rank returns the same lorasum.json. The key does not depend on
    the number of processes (see docs/SCALE.md).
    """
    out = Path(out)
    sources = sources if sources is not None else load_sources(cfg)
    problem = val_rows_problem(cfg, sources)
    if problem:
        raise LorasumError(problem)
    world = world_from_env()
    device = None  # one process picks its device after the reuse check, as it always did
    if world.distributed:
        device = (
            next(model.parameters()).device
            if model is not None
            else rank_device(world, pick_device(cfg.device))
        )
    with process_group(world, device.type if device is not None else "cpu"):
        cfg = _settle_precision(cfg, model, device, world)
        key = adapter_key(cfg, sources)
        finished = _finished(out, key, overwrite, world)
        if finished is not None:
            log.info("reusing finished adapter %s", out)
            return finished
        marker = _train_new(cfg, out, key, model, tokenizer, sources, device, world, progress)
        return world.share(marker)


def _settle_precision(cfg: TrainConfig, model, device, world: World) -> TrainConfig:
    """``cfg`` with ``auto`` replaced by the precision this run uses (``$LORASUM_PRECISION``,
    else the device's verdict; rank 0's on every rank), so the key and lorasum.json name it."""
    if cfg.precision != "auto":
        return cfg
    chosen = None
    if world.is_main:
        if device is None:
            device = next(model.parameters()).device if model is not None else None
        chosen = resolve_precision(cfg.precision, device or pick_device(cfg.device))
    return replace(cfg, precision=world.share(chosen))


def _finished(out: Path, key: str, overwrite: bool, world: World) -> dict | None:
    """The finished adapter's lorasum.json to reuse, or None to train. Rank 0 decides (it alone
    writes ``out``); every rank gets its answer, or raises its error."""
    answer = None
    if world.is_main:
        try:
            answer = (
                read_json(out / "lorasum.json") if check_output_dir(out, key, overwrite) else None
            )
        except LorasumError as e:
            answer = e
    answer = world.share(answer)
    if isinstance(answer, LorasumError):
        raise answer
    return answer


def _train_new(
    cfg: TrainConfig, out: Path, key: str, model, tokenizer, sources, device, world, progress
) -> dict | None:
    """Train and (on rank 0) write the adapter; rank 0's lorasum.json, None on other ranks."""
    from tqdm.auto import tqdm

    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.model)
    if model is None:
        model = load_model(cfg.model, device or pick_device(cfg.device))
    device = next(model.parameters()).device  # a shared model decides where batches go
    amp = autocast_dtype(cfg.precision, device)
    was_training = model.training
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    targets = resolve_target_modules(model, cfg.target_modules)

    train_items = tokenize_cached(tokenizer, sources, "train", cfg.max_length, cfg.answer_only)
    check_answers_fit(train_items, sources, "train", cfg.max_length)
    _, total_steps, last_step = schedule_steps(cfg, len(train_items))
    val_batches = _val_batches(cfg, tokenizer, sources) if cfg.uses_val() else None
    names = [s.name for s in sources]
    peft_model = None
    lean_layers = contextlib.ExitStack()
    try:
        peft_model = _attach_lora(model, cfg, targets)
        run = _start_run(peft_model, cfg, total_steps, amp, len(train_items), world)
        validate = None
        if cfg.eval_every > 0:  # rank 0 evaluates; every rank takes the same stopping decision
            validate = lambda: world.share(  # noqa: E731
                validation_loss(run.peft_model, val_batches, names, device, amp)
                if world.is_main
                else None
            )
        watch = _Watch(cfg.snapshots, cfg.eval_every or 1, cfg.patience, last_step, validate)
        run.peft_model.train()
        t0 = time.perf_counter()
        show = progress and world.is_main
        bar = tqdm(total=last_step, desc=f"train {'+'.join(cfg.data)}", disable=not show)
        # fp32 on a CPU: the same LoRA numbers with about half the activation memory (lean_lora)
        lean_layers.enter_context(lean(run.peft_model, enabled=device.type == "cpu"))
        # bf16 autocast: the frozen linear weights cast once, not on every matmul (same numbers)
        lean_layers.enter_context(frozen_linears_as(run.peft_model, amp))
        # bf16 on a CPU: attention under autograd in fp32 (the bf16 flash backward is slower)
        cpu_bf16 = device.type == "cpu" and amp == torch.bfloat16
        lean_layers.enter_context(fp32_attention_backward(run.peft_model, enabled=cpu_bf16))
        _run_epochs(run, watch, train_items, tokenizer.pad_token_id, out, bar)
        lean_layers.close()
        bar.close()
        if not world.is_main:
            return None
        metrics = _metrics(run, watch, total_steps, time.perf_counter() - t0)
        metrics.update(_final_val(run, watch, val_batches, names, show))
        marker = {
            "kind": "adapter",
            "key": key,
            "lorasum_version": __version__,
            "config": asdict(cfg),
            "target_modules": targets,
            "data": {s.name: s.fingerprint() for s in sources},
            "metrics": metrics,
            "world_size": world.size,  # processes it was trained on (not part of the key)
        }
        _save(out, marker, run, watch, sources)
        return marker
    finally:
        lean_layers.close()
        # Give the caller its base model back as it was: no LoRA layers, same flags and mode.
        restored = peft_model.unload() if peft_model is not None else model
        for n, p in restored.named_parameters():
            p.requires_grad_(requires_grad.get(n, p.requires_grad))
        restored.train(was_training)
