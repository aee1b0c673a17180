"""Train one LoRA adapter on one or more QA sources (several = the merged-data baseline)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from lorasum import __version__
from lorasum.data import Source, check_answers_fit, load_split, make_batches
from lorasum.errors import LorasumError, raise_all
from lorasum.evaluate import autocast_context, evaluate_batches, token_nll
from lorasum.io import atomic_dir, check_output_dir, config_key, read_json
from lorasum.lean import lean
from lorasum.models import (
    autocast_dtype,
    load_model,
    load_tokenizer,
    pick_device,
    resolve_target_modules,
    uses_conv1d,
)
from lorasum.tokens import tokenize_cached

log = logging.getLogger(__name__)


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """Everything that determines a trained adapter. Defaults follow the paper."""

    model: str = _f(
        "default", "base model: 'default' (embedded SmolLM2-135M), a HF id or a local path"
    )
    data: list[str] = _f(
        (),
        "data sources: builtin domain, .jsonl/.csv file or hf:<id>[:split]; several = merged-data training",
        required=True,
    )
    rank: int = _f(4, "LoRA rank r")
    alpha: float = _f(64.0, "LoRA alpha (scale = alpha / r)")
    dropout: float = _f(0.1, "LoRA dropout")
    target_modules: str = _f(
        "auto", "modules to adapt: 'auto' (per-architecture table) or a comma list"
    )
    epochs: float = _f(1.0, "passes over the training split")
    max_steps: int = _f(0, "stop after this many optimizer steps (0 = use --epochs)")
    lr: float = _f(5e-5, "peak learning rate (AdamW, linear decay)")
    warmup_steps: int = _f(2, "linear warmup steps")
    weight_decay: float = _f(0.01, "AdamW weight decay")
    batch_size: int = _f(8, "sequences per optimizer step")
    max_length: int = _f(
        128, "max tokens per sequence (prompt cut from the left, answer from the right)"
    )
    grad_clip: float = _f(1.0, "gradient norm clip (0 = off)")
    seed: int = _f(42, "seed for LoRA init, dropout and batch order")
    split_seed: int = _f(42, "seed of the 80/10/10 train/val/test split")
    max_train: int | None = _f(None, "use at most this many training rows per source")
    max_eval: int | None = _f(None, "use at most this many val/test rows per source")
    answer_only: bool = _f(True, "count answer tokens only in the loss (False: the whole sequence)")
    question_field: str | None = _f(
        None, "question field of .jsonl/.csv/hf sources (auto-detected)"
    )
    answer_field: str | None = _f(None, "answer field of .jsonl/.csv/hf sources (auto-detected)")
    precision: str = _f(
        "auto", "auto (bf16 autocast on CUDA or CPUs with AMX/AVX512-BF16), bf16 or fp32"
    )
    device: str = _f("auto", "auto, cpu or cuda")
    eval_val: bool = _f(True, "report validation perplexity after training")

    def __post_init__(self) -> None:
        if isinstance(self.data, str):
            self.data = [d for d in self.data.split(",") if d]
        self.data = list(self.data)
        problems = []
        if not self.data:
            problems.append("no data given (--data math or --data a.jsonl,b.jsonl)")
        if len(set(self.data)) != len(self.data):
            problems.append(f"data sources repeat: {self.data}; give each source once")
        for name in ("rank", "batch_size", "max_length"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be >= 1")
        if self.alpha <= 0:
            problems.append("--alpha must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            problems.append("--dropout must be in [0, 1)")
        if self.lr <= 0:
            problems.append("--lr must be > 0")
        if self.epochs <= 0 and self.max_steps <= 0:
            problems.append("set --epochs > 0 or --max-steps > 0")
        if self.max_steps < 0 or self.warmup_steps < 0:
            problems.append("--max-steps and --warmup-steps must be >= 0")
        if self.max_length < 8:
            problems.append("--max-length must be >= 8")
        for name in ("max_train", "max_eval"):
            v = getattr(self, name)
            if v is not None and v < 1:
                problems.append(f"--{name.replace('_', '-')} must be >= 1")
        if self.precision not in ("auto", "bf16", "fp32"):
            problems.append(f"--precision {self.precision!r}: use auto, bf16 or fp32")
        raise_all(problems, "invalid training config")

    def identity(self) -> dict:
        """The fields that determine the result (device and reporting do not)."""
        d = asdict(self)
        for k in ("device", "eval_val"):
            d.pop(k)
        return d


def load_sources(cfg: TrainConfig) -> list[Source]:
    return [
        load_split(
            spec, cfg.split_seed, cfg.question_field, cfg.answer_field, cfg.max_train, cfg.max_eval
        )
        for spec in cfg.data
    ]


def adapter_key(cfg: TrainConfig, sources: list[Source]) -> str:
    """Hash of what determines the trained weights (and the reported val metric, if any)."""
    identity = cfg.identity()
    splits = ("train", "val") if cfg.eval_val else ("train",)
    if not cfg.eval_val:
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


def _diverged(peft_model, out: Path, step: int, what: str, log_rows: list[dict], cfg) -> None:
    """Keep the weights before the non-finite step for inspection, then stop with one line."""
    keep = diverged_dir(out)
    kept = ""
    if not keep.exists() or (existing_kind(keep) == "diverged"):
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
    model is left unchanged (LoRA layers are removed again).
    """
    from peft import LoraConfig, get_peft_model
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    out = Path(out)
    sources = sources if sources is not None else load_sources(cfg)
    key = adapter_key(cfg, sources)
    if check_output_dir(out, key, overwrite):
        log.info("reusing finished adapter %s", out)
        return read_json(out / "lorasum.json")

    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.model)
    if model is None:
        model = load_model(cfg.model, pick_device(cfg.device))
    device = next(model.parameters()).device  # a shared model decides where batches go
    amp = autocast_dtype(cfg.precision, device)
    was_training = model.training
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    targets = resolve_target_modules(model, cfg.target_modules)

    train_items = tokenize_cached(tokenizer, sources, "train", cfg.max_length, cfg.answer_only)
    check_answers_fit(train_items, sources, "train", cfg.max_length)
    steps_per_epoch = math.ceil(len(train_items) / cfg.batch_size)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))

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
    peft_model = None
    lean_layers = contextlib.ExitStack()
    try:
        peft_model = get_peft_model(model, lora_config)
        peft_model.peft_config["default"].base_model_name_or_path = cfg.model
        params = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        scheduler = get_linear_schedule_with_warmup(
            optimizer, min(cfg.warmup_steps, total_steps), total_steps
        )
        log_rows: list[dict] = []
        peft_model.train()
        t0 = time.perf_counter()
        tokens_seen = 0
        bar = tqdm(total=total_steps, desc=f"train {'+'.join(cfg.data)}", disable=not progress)
        step, epoch = 0, 0
        # fp32 on a CPU: the same LoRA numbers with about half the activation memory (lean_lora)
        lean_layers.enter_context(lean(peft_model, enabled=device.type == "cpu" and amp is None))
        while step < total_steps:
            batches = make_batches(
                train_items,
                cfg.batch_size,
                tokenizer.pad_token_id,
                shuffle=True,
                seed=cfg.seed + epoch,
            )
            for batch in batches:
                if step >= total_steps:
                    break
                t_step = time.perf_counter()
                batch = batch.to(device)
                with autocast_context(device, amp):
                    row_nll, row_tokens = token_nll(peft_model, batch)
                n_tokens = int(row_tokens.sum())
                loss = row_nll.sum() / max(n_tokens, 1)  # token-weighted mean over the batch
                loss_value = float(loss.detach())
                if not math.isfinite(loss_value):  # checked before any update: weights are good
                    _diverged(peft_model, out, step + 1, f"loss {loss_value}", log_rows, cfg)
                loss.backward()
                grad_norm = (
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                    if cfg.grad_clip > 0
                    else torch.tensor(float("nan"))
                )
                if cfg.grad_clip > 0 and not math.isfinite(float(grad_norm)):
                    _diverged(
                        peft_model,
                        out,
                        step + 1,
                        f"gradient norm {float(grad_norm)}",
                        log_rows,
                        cfg,
                    )
                step_lr = scheduler.get_last_lr()[0]  # the rate this step used
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                real_tokens = int(batch.attention_mask.sum())
                tokens_seen += real_tokens
                log_rows.append(
                    {
                        "step": step,
                        "epoch": epoch,
                        "loss": loss_value,
                        "lr": step_lr,
                        "grad_norm": float(grad_norm),
                        "tokens": n_tokens,
                        "real_tokens": real_tokens,
                        "positions": batch.input_ids.numel(),  # computed, padding included
                        "seconds": time.perf_counter() - t_step,
                    }
                )
                bar.set_postfix(loss=f"{loss_value:.3f}")
                bar.update(1)
            epoch += 1
        lean_layers.close()
        bar.close()
        seconds = time.perf_counter() - t0
        metrics = {
            "steps": total_steps,
            "train_rows": len(train_items),
            "real_tokens": tokens_seen,  # every non-padding token processed (prompt + answer)
            "answer_tokens": sum(r["tokens"] for r in log_rows),  # tokens in the loss
            "final_loss": sum(r["loss"] for r in log_rows[-10:]) / len(log_rows[-10:]),
            "first_loss": log_rows[0]["loss"],
            "seconds": seconds,
            "tokens_per_second": tokens_seen / seconds if seconds > 0 else None,
            "precision": str(amp).replace("torch.", "") if amp else "fp32",
            "device": str(device),
        }
        if cfg.eval_val and any(s.splits["val"] for s in sources):
            val = evaluate_batches(
                peft_model,
                make_batches(
                    tokenize_cached(tokenizer, sources, "val", cfg.max_length, cfg.answer_only),
                    cfg.batch_size,
                    tokenizer.pad_token_id,
                    shuffle=False,
                ),
                [s.name for s in sources],
                device,
                amp,
                progress=progress,
                desc="val",
            )
            metrics["val_perplexity"] = val["perplexity"]
        marker = {
            "kind": "adapter",
            "key": key,
            "lorasum_version": __version__,
            "config": asdict(cfg),
            "target_modules": targets,
            "data": {s.name: s.fingerprint() for s in sources},
            "metrics": metrics,
        }
        with atomic_dir(out, marker=marker) as tmp:
            peft_model.save_pretrained(str(tmp))
            with open(tmp / "train_log.jsonl", "w") as f:
                for row in log_rows:
                    f.write(json.dumps(row) + "\n")
        return marker
    finally:
        lean_layers.close()
        # Give the caller its base model back as it was: no LoRA layers, same flags and mode.
        restored = peft_model.unload() if peft_model is not None else model
        for n, p in restored.named_parameters():
            p.requires_grad_(requires_grad.get(n, p.requires_grad))
        restored.train(was_training)
