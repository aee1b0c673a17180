"""Settings defined once, in five small groups shared by train, eval, predict and reproduce.

Each field's default, help text and check live here and nowhere else:

    DataSettings     which rows, and how they become tokens (sources, split, caps, length)
    LoraSettings     the adapter (rank, alpha, dropout, modules, the policy for A)
    OptimSettings    the optimiser (learning rate, warmup, schedule, batch, clip, seed)
    BudgetSettings   how long it trains (epochs, steps, snapshots, stop, the converged budget)
    RuntimeSettings  where and in what it runs (base model, precision, device, val report)

`TrainConfig` is the groups' fields, flat, in the order `lorasum.json` has always recorded
them, so every cache key and every saved config is what it was. The CLI generates its flags
from the fields (``--max-length`` for ``max_length``, help from ``metadata["help"]``), a study's
``train:`` keys are TrainConfig's fields, and `evaluate`, `predict_domains` and the calibration
take their defaults from the group classes (``DataSettings.max_length`` is the default itself:
a dataclass keeps a field's default as the class attribute).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import Field, asdict, dataclass, field, fields
from typing import Any

from lorasum.errors import raise_all

# The choices of the settings that take a name
LORA_A = ("trained", "frozen", "disjoint")  # see lorasum.training.lora_a
PRECISIONS = ("auto", "bf16", "fp32")  # see lorasum.models.precision.autocast_dtype
# --schedule → the transformers scheduler name: the learning rate after the linear warmup
SCHEDULES = {"linear": "linear", "constant": "constant_with_warmup"}
# Sequences per forward pass where a command only evaluates (no gradients, so larger than the
# training batch); it changes no number, only speed and memory.
EVAL_BATCH_SIZE = 16


# --- a field's check: value → what is wrong (after the flag name), or None --------------------


def at_least(least: int) -> Callable[[Any], str | None]:
    return lambda v: None if v is None or v >= least else f"must be >= {least}"


def above(bound: float) -> Callable[[Any], str | None]:
    return lambda v: None if v > bound else f"must be > {bound:g}"


def one_of(names, joined: str | None = None) -> Callable[[Any], str | None]:
    known = joined or f"one of {', '.join(names)}"
    return lambda v: None if v in names else f"{v!r}: use {known}"


def _fraction(v: float) -> str | None:
    return None if 0.0 <= v < 1.0 else "must be in [0, 1)"


def setting(default, help: str, check: Callable | None = None, **extra) -> Any:
    """A settings field: its default, its help (the CLI's) and its check, given once.
    ``extra``: ``required=True`` (the CLI asks for it)."""
    meta = {"help": help, **extra}
    if check is not None:
        meta["check"] = check
    return field(default=default, metadata=meta)


def flag(name: str) -> str:
    """The command-line flag of a settings field: ``max_length`` → ``--max-length``."""
    return "--" + name.replace("_", "-")


def field_problems(values: Mapping[str, Any], cls: type | None = None) -> list[str]:
    """Every failed field check among ``values`` (settings field name → value), one line each.
    ``cls``: the dataclass whose fields they are (default: the groups')."""
    by_name = {f.name: f for f in fields(cls)} if cls is not None else SETTING_FIELDS
    problems = []
    for name, value in values.items():
        check = by_name[name].metadata.get("check") if name in by_name else None
        wrong = check(value) if check is not None else None
        if wrong is not None:
            problems.append(f"{flag(name)} {wrong}")
    return problems


class _Group:
    """A settings group: build one and its fields are checked (every problem at once)."""

    def __post_init__(self) -> None:
        raise_all(self.problems(self), f"invalid {type(self).__name__}")

    @classmethod
    def problems(cls, s) -> list[str]:
        """What is wrong with the group's fields of ``s`` (this group or a TrainConfig)."""
        return field_problems({f.name: getattr(s, f.name) for f in fields(cls)}, cls)


# --- the groups ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataSettings(_Group):
    """Which rows a run reads, and how they become tokens."""

    data: list[str] = setting(
        (),
        "data sources: builtin domain, .jsonl/.csv file or hf:<id>[:split]; several = merged-data training",
        required=True,
    )
    split_seed: int = setting(42, "seed of the 80/10/10 train/val/test split")
    max_train: int | None = setting(
        None, "use at most this many training rows per source", at_least(1)
    )
    max_eval: int | None = setting(
        None, "use at most this many val/test rows per source", at_least(1)
    )
    max_length: int = setting(
        128,
        "max tokens per sequence (prompt cut from the left, answer from the right)",
        at_least(8),
    )
    answer_only: bool = setting(
        True, "count answer tokens only in the loss (False: the whole sequence)"
    )
    question_field: str | None = setting(
        None, "question field of .jsonl/.csv/hf sources (auto-detected)"
    )
    answer_field: str | None = setting(
        None, "answer field of .jsonl/.csv/hf sources (auto-detected)"
    )
    choices_field: str | None = setting(
        None,
        "multiple-choice options field of .jsonl/.csv/hf sources (default: choices if present)",
    )

    @classmethod
    def problems(cls, s) -> list[str]:
        problems = []
        if not s.data:
            problems.append("no data given (--data math or --data a.jsonl,b.jsonl)")
        if len(set(s.data)) != len(s.data):
            problems.append(f"data sources repeat: {list(s.data)}; give each source once")
        return problems + super().problems(s)


@dataclass(frozen=True)
class LoraSettings(_Group):
    """The adapter: its rank, scale, dropout, modules and what happens to A."""

    rank: int = setting(4, "LoRA rank r", at_least(1))
    alpha: float = setting(64.0, "LoRA alpha (scale = alpha / r)", above(0))
    dropout: float = setting(0.1, "LoRA dropout", _fraction)
    target_modules: str = setting(
        "auto", "modules to adapt: 'auto' (per-architecture table) or a comma list"
    )
    lora_a: str = setting(
        "trained",
        "A matrices: trained (standard LoRA), frozen (A kept at its seeded init, only B "
        "trains: LoRI) or disjoint (A frozen at its --a-slot's rows of a seeded orthonormal "
        "basis, so adapters in different slots have A_i A_j^T = 0 and add without input-side "
        "cross-talk)",
        one_of(LORA_A),
    )
    a_slot: int = setting(
        0, "with --lora-a disjoint: this adapter's slot (rows slot*r .. slot*r+r-1)", at_least(0)
    )
    a_seed: int = setting(
        0, "with --lora-a disjoint: seed of the orthonormal basis the slots share"
    )

    @classmethod
    def problems(cls, s) -> list[str]:
        problems = super().problems(s)
        if s.lora_a != "disjoint" and (s.a_slot or s.a_seed):
            problems.append("--a-slot and --a-seed apply to --lora-a disjoint; add it or drop them")
        return problems


@dataclass(frozen=True)
class OptimSettings(_Group):
    """The optimiser: AdamW's settings, the schedule, the batch and the seed."""

    lr: float = setting(5e-5, "peak learning rate (AdamW; after warmup see --schedule)", above(0))
    warmup_steps: int = setting(2, "linear warmup steps", at_least(0))
    weight_decay: float = setting(0.01, "AdamW weight decay")
    batch_size: int = setting(8, "sequences per optimizer step", at_least(1))
    grad_clip: float = setting(1.0, "gradient norm clip (0 = off)")
    seed: int = setting(42, "seed for LoRA init, dropout and batch order")
    schedule: str = setting(
        "linear",
        "learning rate after warmup: linear (decays to 0 at the run's last step) or constant "
        "(with --eval-every the validation loss ends the run and the cap only bounds it)",
        one_of(SCHEDULES, " or ".join(SCHEDULES)),
    )


@dataclass(frozen=True)
class BudgetSettings(_Group):
    """How long a run trains: passes or steps, where it stops, what it keeps on the way."""

    epochs: float = setting(1.0, "passes over the training split")
    max_steps: int = setting(
        0, "stop after this many optimizer steps (0 = use --epochs)", at_least(0)
    )
    snapshots: list[int] = setting(
        (),
        "optimizer steps at which to also save the adapter, in <out>/snapshots/step-<N>/ "
        "(e.g. 2,4). A snapshot is taken mid-schedule: its learning rate has not decayed, so "
        "it is not the adapter a full training of that length gives (that is --max-steps N); "
        "it equals a training with --stop-at N",
    )
    stop_at: int = setting(
        0,
        "stop after this many optimizer steps on the unchanged schedule (its learning rate "
        "still decays over --epochs/--max-steps); 0 = off",
        at_least(0),
    )
    eval_every: int = setting(
        0,
        "converged budget: evaluate the validation loss every this many steps (and at the "
        "last), stop after --patience evaluations without improvement and keep the best "
        "weights; 0 = off",
        at_least(0),
    )
    patience: int = setting(
        3,
        "with --eval-every: evaluations without a lower validation loss before stopping",
        at_least(1),
    )
    max_epochs: float = setting(
        0.0,
        "with --eval-every: at most this many passes; a linear schedule decays over them "
        "(0 = the cap is --epochs/--max-steps)",
        at_least(0),
    )

    @classmethod
    def problems(cls, s) -> list[str]:
        problems = super().problems(s)
        if s.epochs <= 0 and s.max_steps <= 0:
            problems.append("set --epochs > 0 or --max-steps > 0")
        if s.max_epochs > 0 and s.eval_every == 0:
            problems.append(
                "--max-epochs caps a --eval-every run; set --eval-every or use --epochs"
            )
        if s.eval_every > 0 and s.max_epochs > 0 and s.max_steps > 0:
            problems.append("give the cap as --max-epochs or as --max-steps, not both")
        return problems


@dataclass(frozen=True)
class RuntimeSettings(_Group):
    """Where and in what a run computes, and what it reports beside its result."""

    model: str = setting(
        "default", "base model: 'default' (embedded SmolLM2-135M), a HF id or a local path"
    )
    precision: str = setting(
        "auto",
        "auto (bf16 autocast on CUDA or CPUs with AMX/AVX512-BF16), bf16 or fp32",
        one_of(PRECISIONS, "auto, bf16 or fp32"),
    )
    device: str = setting("auto", "auto, cpu or cuda")
    eval_val: bool = setting(True, "report validation perplexity after training")


GROUPS: tuple[type[_Group], ...] = (
    DataSettings,
    LoraSettings,
    OptimSettings,
    BudgetSettings,
    RuntimeSettings,
)
# every settings field by name (the names are unique across the groups; tests/test_settings.py)
SETTING_FIELDS: dict[str, Field] = {f.name: f for g in GROUPS for f in fields(g)}


def group_of(name: str) -> type[_Group]:
    """The group that defines the settings field ``name``."""
    return next(g for g in GROUPS if name in {f.name for f in fields(g)})


def _same(name: str) -> Any:
    """The settings field ``name`` again, for the flat TrainConfig: its default and metadata."""
    f = SETTING_FIELDS[name]
    return field(default=f.default, metadata=f.metadata)


# --- one adapter's training: the groups' fields, flat -------------------------------------------


@dataclass
class TrainConfig:
    """Everything that determines a trained adapter (defaults follow the paper): every field of
    the five groups, flat, in the order lorasum.json records them; each default, help text and
    check is its group's."""

    model: str = _same("model")
    data: list[str] = _same("data")
    rank: int = _same("rank")
    alpha: float = _same("alpha")
    dropout: float = _same("dropout")
    target_modules: str = _same("target_modules")
    lora_a: str = _same("lora_a")
    a_slot: int = _same("a_slot")
    a_seed: int = _same("a_seed")
    epochs: float = _same("epochs")
    max_steps: int = _same("max_steps")
    lr: float = _same("lr")
    warmup_steps: int = _same("warmup_steps")
    weight_decay: float = _same("weight_decay")
    batch_size: int = _same("batch_size")
    max_length: int = _same("max_length")
    grad_clip: float = _same("grad_clip")
    seed: int = _same("seed")
    split_seed: int = _same("split_seed")
    max_train: int | None = _same("max_train")
    max_eval: int | None = _same("max_eval")
    answer_only: bool = _same("answer_only")
    question_field: str | None = _same("question_field")
    answer_field: str | None = _same("answer_field")
    choices_field: str | None = _same("choices_field")
    precision: str = _same("precision")
    device: str = _same("device")
    eval_val: bool = _same("eval_val")
    snapshots: list[int] = _same("snapshots")
    stop_at: int = _same("stop_at")
    eval_every: int = _same("eval_every")
    patience: int = _same("patience")
    max_epochs: float = _same("max_epochs")
    schedule: str = _same("schedule")

    def __post_init__(self) -> None:
        if isinstance(self.data, str):
            self.data = [d for d in self.data.split(",") if d]
        self.data = list(self.data)
        problems: list[str] = []
        self.snapshots = _step_list(self.snapshots, problems)
        for group in GROUPS:
            problems += group.problems(self)
        raise_all(problems, "invalid training config")

    def identity(self) -> dict:
        """The fields that determine the result (device and reporting do not)."""
        d = asdict(self)
        # choices_field only says where the options are (they never reach training; the answer
        # text it may pick is in the data fingerprint): keys stay those of before it existed
        for k in ("device", "eval_val", "choices_field"):
            d.pop(k)
        # The budget fields join the identity only when used: adapters trained without them
        # keep the keys they had before the fields existed, so finished studies are reused.
        unused = [k for k in ("snapshots", "stop_at") if not d[k]]
        if self.lora_a == "trained":  # likewise: standard adapters keep their keys
            unused += ["lora_a", "a_slot", "a_seed"]
        elif self.lora_a == "frozen":
            unused += ["a_slot", "a_seed"]
        if self.schedule == "linear":
            unused.append("schedule")
        if not self.eval_every:
            unused += ["eval_every", "patience", "max_epochs"]
        for k in unused:
            d.pop(k)
        return d

    def uses_val(self) -> bool:
        """Whether the val split decides something recorded (its metric or the weights)."""
        return self.eval_val or self.eval_every > 0


def _step_list(value, problems: list[str]) -> list[int]:
    """``"2,4"`` / ``["2", "4"]`` / ``(2, 4)`` → ``[2, 4]`` (sorted, once each)."""
    if isinstance(value, str):
        value = value.split(",")
    steps = set()
    for v in value:
        text = str(v).strip()
        if not text:
            continue
        try:
            step = int(text)
        except ValueError:
            problems.append(f"--snapshots {text!r}: give optimizer steps as integers, e.g. 2,4")
            continue
        if step < 1:
            problems.append(f"--snapshots {step}: snapshot steps must be >= 1")
        steps.add(step)
    return sorted(steps)


def setting_types() -> dict[str, Any]:
    """Each settings field's type (the annotation, resolved)."""
    import typing

    return {n: t for g in GROUPS for n, t in typing.get_type_hints(g).items()}
