"""Command line: parse arguments, call the library, print. No logic of its own.

User mistakes (LorasumError) print one line `lorasum: error: …` and exit with code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import types
import typing

from lorasum._version import __version__
from lorasum.errors import LorasumError
from lorasum.io import dumps_strict


def _add_dataclass_flags(
    parser: argparse.ArgumentParser, cls, skip: set[str] = frozenset(), defaults: bool = True
) -> None:
    """One flag per config field: type and help come from the dataclass (single source of truth)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        typ = hints[f.name]
        if typing.get_origin(typ) in (typing.Union, types.UnionType):
            typ = next(a for a in typing.get_args(typ) if a is not type(None))
        default = f.default if defaults else None
        if typ is bool:
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=default, help=help_text
            )
        elif typing.get_origin(typ) is list:
            parser.add_argument(
                flag,
                type=lambda s: [x for x in s.split(",") if x],
                default=None if not defaults else list(f.default),
                required=defaults and f.metadata.get("required", False),
                help=help_text + " (comma list)",
            )
        else:
            parser.add_argument(
                flag,
                type=typ,
                default=default,
                help=f"{help_text} (default: {f.default})" if defaults else help_text,
            )


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: what is wrong and where to look, not the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _add_train(sub) -> None:
    """`lorasum train`'s flags."""
    from lorasum.train import TrainConfig

    t = sub.add_parser(
        "train", help="train one LoRA adapter (several --data = merged-data baseline)"
    )
    t.add_argument("--out", required=True, help="adapter directory to write (PEFT format)")
    t.add_argument("--overwrite", action="store_true", help="replace a different result in --out")
    _add_dataclass_flags(t, TrainConfig)
    t.add_argument(
        "--full-sequence",
        dest="answer_only",
        action="store_false",
        help="count the whole sequence in the loss, not only the answer",
    )


def _add_compose(sub) -> None:
    """`lorasum compose`'s flags."""
    from lorasum.export.gguf_lora import OUTTYPES
    from lorasum.methods import MergeConfig

    c = sub.add_parser(
        "compose",
        help="merge adapters into one PEFT adapter (exact sum by default, or --method)",
    )
    c.add_argument("adapters", nargs="+", help="PEFT LoRA adapter directories")
    c.add_argument("--out", required=True, help="composed adapter directory to write")
    c.add_argument(
        "--weights",
        default=None,
        help="one weight per adapter, e.g. 1,0.5,-1 (default: all 1; negative = task negation)",
    )
    c.add_argument(
        "--merge-into-base",
        default=None,
        metavar="DIR",
        help="also write base model + ΔW as a full transformers model to DIR",
    )
    c.add_argument(
        "--model",
        default=None,
        help="base model for --merge-into-base and --calibration (default: the adapters')",
    )
    c.add_argument(
        "--calibration",
        nargs="+",
        default=None,
        metavar="SOURCES",
        help="methods that need calibration (regmean, regmean_rescaled, orthogonal_projection, "
        "soft_projection, shift_match): per adapter, the data whose "
        "inputs calibrate it (a comma list of sources, or 'own'); default: each adapter's own "
        "training data from its lorasum.json. Statistics are cached beside each adapter",
    )
    c.add_argument("--overwrite", action="store_true", help="replace a different result in --out")
    c.add_argument(
        "--check",
        action="store_true",
        help="before composing, print the interference forecast of `lorasum predict` "
        "(predicted Δ%% vs merged-data training with --fit, driving pair and modules, method)",
    )
    c.add_argument(
        "--fit",
        nargs="+",
        default=None,
        metavar="STUDY_DIR",
        help="with --check: finished studies (results.json) to fit the forecast on",
    )
    c.add_argument(
        "--format",
        default="peft",
        choices=["peft", "gguf"],
        help="gguf: also write the composed adapter as a GGUF LoRA for llama.cpp/Ollama into "
        "OUT/gguf/ (adapter.gguf, Modelfile, README.md)",
    )
    c.add_argument("--outtype", default="f32", choices=list(OUTTYPES), help="GGUF tensor type")
    _add_dataclass_flags(c, MergeConfig, defaults=False)  # unset = the method's default


def _add_export(sub) -> None:
    """`lorasum export`'s flags."""
    from lorasum.export.gguf_lora import OUTTYPES

    x = sub.add_parser(
        "export",
        help="write an adapter for llama.cpp/Ollama: a GGUF LoRA file, a Modelfile and a card",
    )
    x.add_argument("adapter", help="PEFT LoRA adapter directory")
    x.add_argument("--format", default="gguf", choices=["gguf"], help="output format")
    x.add_argument("--out", required=True, help="the .gguf file to write")
    x.add_argument(
        "--outtype",
        default=None,
        choices=sorted({*OUTTYPES, "base"}),
        help="GGUF tensor type: f32 (default), f16, q8_0; with --merged: base (default: each "
        "weight in the base file's type), f32, f16",
    )
    x.add_argument(
        "--merged",
        action="store_true",
        help="write the base GGUF with the adapter added: a full model file, no adapter needed",
    )
    x.add_argument(
        "--model",
        default=None,
        help="base model (default: the adapter's; `default` = the embedded GGUF)",
    )
    x.add_argument(
        "--base-gguf",
        default=None,
        metavar="FILE",
        help="the base model's GGUF file (architecture, shape check, Modelfile FROM)",
    )
    x.add_argument(
        "--overwrite", action="store_true", help="replace files beside --out not written by export"
    )


def _add_predict(sub) -> None:
    """`lorasum predict`'s flags."""
    from lorasum.analysis.predictors import ADAPTER_NEEDS, predictor_names

    pr = sub.add_parser(
        "predict",
        help="interference of adapters before composing: predictors, and with --fit the "
        "predicted Δ%% of their sum vs merged-data training, the driving pair and a method; "
        "with --domains instead of adapters, predictors that need no adapter (before training)",
    )
    pr.add_argument("adapters", nargs="*", help="PEFT LoRA adapter directories (two or more)")
    pr.add_argument(
        "--domains",
        default=None,
        help="instead of adapters: a comma list of domains (builtin names or NAME=SOURCE) whose "
        "adapter-free predictors (gradient cosine at the base model, base loss) are computed "
        "for every combination, before any training",
    )
    pr.add_argument(
        "--fit",
        nargs="+",
        default=None,
        metavar="STUDY_DIR",
        help="finished `lorasum reproduce` directories whose results.json the forecast is fitted on",
    )
    pr.add_argument(
        "--predictor",
        default="auto",
        help=f"{', '.join(predictor_names(ADAPTER_NEEDS))} (with --domains: "
        f"{', '.join(predictor_names(needing='base_model_data'))}) or auto "
        "(the best leave-one-combination-out Spearman over the --fit studies; default)",
    )
    pr.add_argument(
        "--calibration",
        nargs="+",
        default=None,
        metavar="SOURCES",
        help="per adapter, the data whose inputs calibrate it (a comma list of sources, or "
        "'own'); default: each adapter's own training data from its lorasum.json",
    )
    pr.add_argument(
        "--model",
        default=None,
        help="base model (default: the adapters'; with --domains the embedded SmolLM2-135M)",
    )
    for flag, kind, default, help_text in (
        ("--max-length", int, 128, "with --domains: tokens per row (match the --fit studies)"),
        ("--max-train", int, 64, "with --domains: train rows per domain (match the studies)"),
        ("--split-seed", int, 42, "with --domains: seed of the 80/10/10 split"),
        ("--max-order", int, None, "with --domains: combinations of at most this many domains"),
        ("--target-modules", str, "auto", "with --domains: the modules adapters would target"),
    ):
        pr.add_argument(flag, type=kind, default=default, help=help_text)
    pr.add_argument("--json", action="store_true", help="print JSON")


def _add_similarity(sub) -> None:
    """`lorasum similarity`'s flags."""
    s = sub.add_parser(
        "similarity",
        help="how alike adapters are: N×N cosines of ΔW, per layer/type, principal angles",
    )
    s.add_argument("adapters", nargs="+", help="PEFT LoRA adapter directories (two or more)")
    s.add_argument("--json", action="store_true", help="print JSON (per-module values included)")
    s.add_argument(
        "--plot",
        default=None,
        metavar="DIR",
        help="write a cosine heatmap and a per-layer plot (PNG) and similarity.json to DIR",
    )


def _add_eval(sub) -> None:
    """`lorasum eval`'s flags."""
    from lorasum.accuracy import DEFAULT_MAX_NEW_TOKENS, METRICS

    e = sub.add_parser(
        "eval", help="answer-only perplexity (and task accuracy) of a model (and adapter) on data"
    )
    e.add_argument("--model", default="default", help="base model (default: embedded SmolLM2-135M)")
    e.add_argument("--adapter", default=None, help="PEFT LoRA adapter directory to apply")
    e.add_argument(
        "--data", nargs="+", required=True, help="data sources (builtin, .jsonl/.csv, hf:id)"
    )
    e.add_argument("--split", default="test", choices=["train", "val", "test"])
    e.add_argument("--max-length", type=int, default=128)
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument(
        "--split-seed", type=int, default=42, help="must match the training's split seed"
    )
    e.add_argument("--max-eval", type=int, default=None, help="at most this many rows per source")
    e.add_argument(
        "--full-sequence",
        dest="answer_only",
        action="store_false",
        help="count the whole sequence, not only the answer",
    )
    e.add_argument("--question-field", default=None)
    e.add_argument("--answer-field", default=None)
    e.add_argument(
        "--choices-field",
        default=None,
        help="field holding a row's options (a list; default: choices if present)",
    )
    e.add_argument(
        "--metric",
        default="perplexity",
        choices=list(METRICS),
        help="perplexity (default), accuracy (acc/acc_norm over options, exact match of short "
        "answers; lm-eval conventions) or all",
    )
    e.add_argument(
        "--max-new-tokens",
        type=int,
        default=DEFAULT_MAX_NEW_TOKENS,
        help=f"greedy tokens generated for exact match (default: {DEFAULT_MAX_NEW_TOKENS})",
    )
    e.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    e.add_argument("--device", default="auto")
    e.add_argument("--json", action="store_true", help="print JSON")


def _add_reproduce(sub) -> None:
    """`lorasum reproduce`'s flags."""
    from lorasum.study.config import STUDY_TRAIN_EXCLUDED, preset_names
    from lorasum.train import TrainConfig

    r = sub.add_parser(
        "reproduce", help="run the paper's study: train, sum, compare, correlate, report"
    )
    r.add_argument(
        "--preset",
        default=None,
        choices=preset_names(),
        help="settings to start from (YAML files shipped in lorasum/presets; default: quick, "
        "or the preset named in --config)",
    )
    r.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="experiment file (YAML: model, domains, seeds, methods, train settings, ...); "
        "flags override it; the resolved settings are saved as experiment.yaml in --out",
    )
    r.add_argument("--model", default=None, help="base model (default: embedded SmolLM2-135M)")
    r.add_argument(
        "--domains",
        default=None,
        help="comma list of builtin domains, 'all' (every builtin domain) or NAME=SOURCE "
        "(e.g. fin=hf:org/ds); default: math,medicine,finance",
    )
    r.add_argument(
        "--methods",
        default=None,
        help="merge methods to compare on every combination, comma list or 'all' (every "
        "method a study can run without extra input); the sum always runs",
    )
    r.add_argument(
        "--routes",
        default=None,
        help="routing instead of adding, reported beside the methods: comma list of oracle "
        "(each row's own single adapter), nearest (each row to the adapter whose "
        "training-prompt centroid is closest), gaussian (each row to the adapter under whose "
        "Gaussian of its first 64 training prompts the row is likeliest), mixture (gaussian "
        "made soft: each row scored by the mix of the adapters its tempered posterior keeps) "
        "and arrow (PEFT's "
        "per-token Arrow mix of the adapters); default none",
    )
    r.add_argument(
        "--metrics",
        default=None,
        help="what every evaluation measures: perplexity (default; the primary metric) or "
        "perplexity,accuracy (also task accuracy, lm-eval conventions: units of their own, "
        "so adding it later reuses the study; see docs/MANUAL.md)",
    )
    r.add_argument("--out", required=True, help="study directory (results.json, report.md, png)")
    r.add_argument("--overwrite", action="store_true", help="replace a study with other settings")
    r.add_argument(
        "--seeds",
        type=lambda v: [int(x) for x in v.split(",") if x.strip()],
        default=None,
        help="run the grid once per training seed (e.g. 1,2,3): means, 95%% intervals, "
        "correlation over all runs (default: --seed)",
    )
    for flag, help_text in (
        (
            "--predictors",
            "calibrate the domain adapters and record the activation-space "
            "interference predictors (RMS cosine is always recorded)",
        ),
        ("--cross-domain", "evaluate every single adapter on every domain's test split"),
        ("--paper-variants", "for triples, also the merged-data pair adapter + third single"),
    ):
        r.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
    r.add_argument(
        "--seed-per-domain",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="give each domain adapter its own LoRA init seed (default: one shared seed, "
        "as in the paper's scripts)",
    )
    _add_grid_flags(r)
    _add_run_flags(r)
    _add_dataclass_flags(r, TrainConfig, skip=set(STUDY_TRAIN_EXCLUDED), defaults=False)


def _add_grid_flags(r) -> None:
    """`lorasum reproduce`'s flags of which combinations run: max order, sample."""
    r.add_argument(
        "--max-order",
        type=int,
        default=None,
        help="combinations of at most this many domains (2 = pairs only; default: all sizes)",
    )
    r.add_argument(
        "--sample",
        type=int,
        default=None,
        metavar="K",
        help="run K of the combinations of each order (all of an order with at most K), "
        "chosen with --sample-seed, the same for every training seed; default 0: all",
    )
    r.add_argument(
        "--sample-seed",
        type=int,
        default=None,
        metavar="S",
        help="seed of the --sample choice (default 0; not a training seed)",
    )


def _add_run_flags(r) -> None:
    """`lorasum reproduce`'s flags of how the study runs: workers, executor, plan, budget."""
    from lorasum.study.config import BUDGETS

    r.add_argument(
        "--workers",
        type=int,
        default=None,
        help="worker processes for the study's units (default: one per CPU core, at most 4, "
        "memory allowing; one per GPU). Results do not depend on it",
    )
    r.add_argument(
        "--executor",
        choices=["local", "ray"],
        default="local",
        help="where units run: local worker processes, or Ray actors (extra lorasum[ray]); "
        "results do not depend on it",
    )
    r.add_argument(
        "--ray-address",
        default=None,
        metavar="auto|HOST:PORT",
        help="with --executor ray: the running Ray cluster to use (auto: the one `ray start` "
        "made on this node); default: start a local Ray instance on this machine",
    )
    r.add_argument(
        "--plan",
        action="store_true",
        help="print the plan (units by kind, cached / to run, estimated time) and run nothing",
    )
    r.add_argument(
        "--verify",
        action="store_true",
        help="check every finished unit's files against the study's ledger (units.json) and "
        "run nothing: counts per kind, one line per damaged unit, exit 1 if any",
    )
    r.add_argument(
        "--wait",
        action="store_true",
        help="if another run holds the study directory, wait for it to finish (default: stop "
        "at once, naming it)",
    )
    r.add_argument(
        "--budget",
        choices=list(BUDGETS),
        default=None,
        help="how long each adapter trains: epochs (default, the paper's: equal passes), "
        "steps (every adapter of a combination takes the merged-data adapter's optimizer "
        "steps) or converged (a constant learning rate, early stopping on validation loss: "
        "--eval-every, --patience, --max-epochs as a cap); see docs/BUDGETS.md",
    )
    r.add_argument(
        "--snapshots",
        default=None,
        metavar="EPOCHS",
        help="evaluate along each run at these epochs, e.g. 0.25,0.5,1,2,4 (each adapter "
        "trains for the last; pairs singles and merged adapters by equal epochs and steps)",
    )
    r.add_argument(
        "--merge-aware",
        action="store_true",
        default=None,
        help="with --budget converged: single adapters keep a checkpoint at every validation "
        "point, and each combination also sums its singles' checkpoints chosen by the sum's "
        "validation perplexity (method row merge_aware; see docs/BUDGETS.md)",
    )
    r.add_argument(
        "--equal-params",
        action="store_true",
        default=None,
        help="with --lora-a frozen or disjoint: single adapters at twice the rank and alpha, "
        "training about as many parameters as the standard rank-r LoRA (the merged-data "
        "baseline stays rank r)",
    )


def _add_report(sub) -> None:
    """`lorasum report`'s flags."""
    rep = sub.add_parser(
        "report", help="rebuild report.md and report.html of a study from its results.json"
    )
    rep.add_argument("run_dir", help="the study directory (--out of `lorasum reproduce`)")


def _add_assets(sub) -> None:
    """`lorasum assets`'s flags."""
    sub.add_parser("assets", help="check the embedded model and data, and build the model cache")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="lorasum",
        description="Modular fine-tuning by adding LoRA adapters: train, compose exactly, "
        "measure orthogonality, evaluate, and run the naive-summation study.",
    )
    p.add_argument("--version", action="version", version=f"lorasum {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = p.add_subparsers(dest="command", required=True)

    _add_train(sub)
    _add_compose(sub)
    _add_export(sub)
    _add_predict(sub)
    _add_similarity(sub)
    _add_eval(sub)
    _add_reproduce(sub)
    _add_report(sub)
    _add_assets(sub)
    _add_safety_flags(sub)
    return p


def _add_safety_flags(sub) -> None:
    """--allow-pickle / --trust-remote-code on every command (both off by default)."""
    for command in sub.choices.values():
        command.add_argument(
            "--allow-pickle",
            action="store_true",
            help="load pickle checkpoints (adapter_model.bin, pytorch_model.bin) with "
            "torch.load(weights_only=True); default: safetensors only",
        )
        command.add_argument(
            "--trust-remote-code",
            action="store_true",
            help="let a model run its own Python code (auto_map); default: refused",
        )


def _apply_safety_flags(args: argparse.Namespace) -> None:
    """The flags become environment variables, so worker processes follow them too."""
    import os

    from lorasum.models import ALLOW_PICKLE_ENV, TRUST_REMOTE_CODE_ENV

    if getattr(args, "allow_pickle", False):
        os.environ[ALLOW_PICKLE_ENV] = "1"
    if getattr(args, "trust_remote_code", False):
        os.environ[TRUST_REMOTE_CODE_ENV] = "1"


def _cmd_train(args: argparse.Namespace) -> int:
    """`lorasum train`."""
    from lorasum.distributed import world_from_env
    from lorasum.train import TrainConfig, train

    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    marker = train(cfg, args.out, overwrite=args.overwrite)
    m = marker["metrics"]
    val = f", val ppl {m['val_perplexity']:.3f}" if "val_perplexity" in m else ""
    if world_from_env().is_main:  # under torchrun: rank 0 speaks for all
        print(
            f"adapter written to {args.out} ({m['steps']} steps, loss {m['first_loss']:.3f} → "
            f"{m['final_loss']:.3f}{val})"
        )
    return 0


def _cmd_compose(args: argparse.Namespace) -> int:
    """`lorasum compose`."""
    from lorasum.compose import compose
    from lorasum.methods import MergeConfig

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(MergeConfig)}
    config = MergeConfig(**{k: v for k, v in given.items() if v is not None})
    if args.fit and not args.check:
        raise LorasumError("--fit applies to --check; add --check or drop --fit")
    if args.check:
        from lorasum.analysis.predict import format_prediction, predict_interference
        from lorasum.methods import get_method

        uses_data = get_method(config.method).calibration  # else --calibration is refused
        check = predict_interference(
            args.adapters,
            fit=args.fit,
            calibration=args.calibration if uses_data else None,
            model=args.model,
        )
        print(format_prediction(check, warning=True), flush=True)
    marker = compose(
        args.adapters,
        args.out,
        weights=args.weights,
        merge_into_base=args.merge_into_base,
        model=args.model,
        overwrite=args.overwrite,
        config=config,
        calibration=args.calibration,
        format=args.format,
        outtype=args.outtype,
    )
    recipe = marker.get("recipe") or {}
    detail = f"method {marker.get('method', 'sum')}"
    if recipe:
        kept = [m["kept_energy"] for m in recipe["modules"].values()]
        detail += f", rank {recipe['rank']}, {len(kept)} modules"
        if min(kept) < 1.0:
            detail += f", kept energy min {min(kept):.4f}"
    print(f"composed adapter written to {args.out} ({detail})")
    if args.merge_into_base:
        print(f"merged model written to {marker['merged_model']}")
    if "gguf" in marker:
        print(f"GGUF LoRA written to {marker['gguf']} (Modelfile and README.md beside it)")
    return 0


def _cmd_predict_domains(args: argparse.Namespace) -> int:
    """`lorasum predict` --domains: predictors of the data alone, before training."""
    from lorasum.analysis.predict import format_domain_prediction, predict_domains
    from lorasum.study.reproduce import parse_domains

    if args.adapters or args.calibration:
        raise LorasumError("--domains replaces adapters and --calibration; give one or other")
    result = predict_domains(
        parse_domains(args.domains),
        model=args.model or "default",
        fit=args.fit,
        predictor=args.predictor,
        max_length=args.max_length,
        max_train=args.max_train,
        split_seed=args.split_seed,
        target_modules=args.target_modules,
        max_order=args.max_order,
    )
    print(dumps_strict(result) if args.json else format_domain_prediction(result))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    """`lorasum export`."""
    from lorasum.export import export_adapter, export_merged

    if args.merged:
        info = export_merged(
            args.adapter,
            args.out,
            outtype=args.outtype or "base",
            model=args.model,
            base_gguf=args.base_gguf,
            overwrite=args.overwrite,
        )
        print(
            f"merged GGUF model written to {info['gguf']} ({info['merged_tensors']} weights "
            f"merged, requantisation error {info['requant_error_median']:.3g} of ΔW, median); "
            "Modelfile and README.md beside it"
        )
        return 0
    info = export_adapter(
        args.adapter,
        args.out,
        format=args.format,
        outtype=args.outtype or "f32",
        model=args.model,
        base_gguf=args.base_gguf,
        overwrite=args.overwrite,
    )
    print(
        f"GGUF LoRA written to {info['gguf']} ({info['arch']}, {info['modules']} modules, "
        f"rank {info['rank']}, alpha {info['alpha']:g}); Modelfile and README.md beside it"
    )
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    """`lorasum predict`."""
    from lorasum.analysis.predict import format_prediction, predict_interference

    result = predict_interference(
        args.adapters,
        fit=args.fit,
        predictor=args.predictor,
        calibration=args.calibration,
        model=args.model,
    )
    print(dumps_strict(result) if args.json else format_prediction(result))
    return 0


def _cmd_similarity(args: argparse.Namespace) -> int:
    """`lorasum similarity`."""
    from lorasum.analysis.similarity import format_similarity, similarity

    result = similarity(args.adapters, plot=args.plot)
    if args.json:
        print(dumps_strict(result))
    else:
        print(format_similarity(result))
    if args.plot:
        print(f"plots written to {args.plot}", file=sys.stderr if args.json else sys.stdout)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    """`lorasum eval`."""
    from lorasum.evaluate import evaluate

    result = evaluate(
        model=args.model,
        data=args.data,
        adapter=args.adapter,
        split=args.split,
        max_length=args.max_length,
        batch_size=args.batch_size,
        split_seed=args.split_seed,
        max_eval=args.max_eval,
        answer_only=args.answer_only,
        question_field=args.question_field,
        answer_field=args.answer_field,
        precision=args.precision,
        device=args.device,
        progress=not args.json,
        metric=args.metric,
        max_new_tokens=args.max_new_tokens,
        choices_field=args.choices_field,
    )
    if args.json:
        print(dumps_strict(result))
        return 0
    if "perplexity" in result:
        for name, d in result["per_dataset"].items():
            print(f"{name:<32} perplexity {d['perplexity']:10.4f}  ({d['tokens']} tokens)")
        print(f"{'all':<32} perplexity {result['perplexity']:10.4f}  ({result['tokens']} tokens)")
    if "accuracy" in result:
        from lorasum.accuracy import format_accuracy

        acc = result["accuracy"]
        for name, d in acc["per_dataset"].items():
            print(f"{name:<32} {format_accuracy(d)}")
        print(f"{'all':<32} {format_accuracy(acc)}")
    return 0


def _cmd_reproduce(args: argparse.Namespace) -> int:
    """`lorasum reproduce`."""
    from lorasum.study.config import STUDY_TRAIN_EXCLUDED
    from lorasum.study.reproduce import reproduce
    from lorasum.train import TrainConfig

    overrides = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(TrainConfig)
        if f.name not in STUDY_TRAIN_EXCLUDED
    }
    results = reproduce(
        args.out,
        preset=args.preset,
        config=args.config,
        methods=args.methods,
        routes=args.routes,
        metrics=args.metrics,
        predictors=args.predictors,
        cross_domain=args.cross_domain,
        paper_variants=args.paper_variants,
        model=args.model,
        domains=args.domains,
        overwrite=args.overwrite,
        seed_per_domain=args.seed_per_domain,
        seeds=args.seeds,
        workers=args.workers,
        max_order=args.max_order,
        sample=args.sample,
        sample_seed=args.sample_seed,
        executor=args.executor,
        ray_address=args.ray_address,
        plan_only=args.plan,
        verify=args.verify,
        wait=args.wait,
        budget=args.budget,
        snapshots=args.snapshots,
        merge_aware=args.merge_aware,
        equal_params=args.equal_params,
        **overrides,
    )
    if args.plan:
        print(results["plan"])
        return 0
    if args.verify:
        print(results["text"])
        return 0 if results["ok"] else 1
    hw = results["manifest"]["hardware"]
    print(f"ran in {hw['precision']} on {hw['cpu']} ({hw['cores']} cores, device {hw['device']})")
    for row in results["combinations"]:
        print(
            f"{' + '.join(row['domains']):<32} RMS cos {row['rms_cosine']:.4f}  "
            f"ppl merged {row['ppl_merged']:.3f}  sum {row['ppl_sum']:.3f}  "
            f"Δ {row['delta_pct']:+.2f}%"
            + (
                f"  best {row['best_method']} {row['methods'][row['best_method']]['delta_pct']:+.2f}%"
                if len(row.get("methods", {})) > 1
                else ""
            )
        )
    c = results["correlation"]
    r_text = "n/a" if c["pearson_r"] is None else f"{c['pearson_r']:.3f}"
    print(f"Pearson r (Δ% vs RMS cosine): {r_text}")
    print(
        f"report: {args.out}/report.html (and .md)  results: {args.out}/results.json  "
        f"plot: {args.out}/cosine_vs_delta.png  ({results['wall_seconds']:.0f} s)"
    )
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    """`lorasum report`."""
    from lorasum.report.build import rebuild_report

    paths = rebuild_report(args.run_dir)
    print(f"report: {paths['markdown']}  {paths['html']}  plot: {paths['plot']}")
    return 0


def _cmd_assets(args: argparse.Namespace) -> int:
    """`lorasum assets`."""
    from lorasum.data import BUILTIN_DOMAINS, load_builtin
    from lorasum.models import EMBEDDED_SHA256, embedded_gguf_path, prepare_default_model

    for name in BUILTIN_DOMAINS:
        rows, origin = load_builtin(name)
        print(f"data {name:<12} {len(rows):>5} rows  {origin}")
    print(f"model default: {prepare_default_model()}")
    print(f"base GGUF (llama.cpp): {embedded_gguf_path()}  sha256 {EMBEDDED_SHA256}")
    return 0


def _cmd_predict_any(args: argparse.Namespace) -> int:
    return _cmd_predict_domains(args) if args.domains is not None else _cmd_predict(args)


def _run(args: argparse.Namespace) -> int:
    return COMMANDS[args.command](args)


COMMANDS = {
    "train": _cmd_train,
    "compose": _cmd_compose,
    "predict": _cmd_predict_any,
    "export": _cmd_export,
    "similarity": _cmd_similarity,
    "eval": _cmd_eval,
    "reproduce": _cmd_reproduce,
    "report": _cmd_report,
    "assets": _cmd_assets,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        from lorasum.logs import quiet_libraries

        quiet_libraries()
    try:
        _apply_safety_flags(args)
        return _run(args)
    except LorasumError as e:
        print(f"lorasum: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "lorasum: interrupted; finished units are kept and reused on the next run",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
