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
from lorasum.settings import flag


def _flag_type(typ):
    """The scalar type a flag parses to: Optional[X] → X; a mapping is given as text (the
    settings' own parser reads it, e.g. ``--domains a=x.jsonl,b``)."""
    if typing.get_origin(typ) in (typing.Union, types.UnionType):
        typ = next(a for a in typing.get_args(typ) if a is not type(None))
    return str if typing.get_origin(typ) is dict else typ


def _add_field_flag(parser, f: dataclasses.Field, typ, default, show_default: bool, prefix=""):
    """One flag for a settings field: ``--max-length`` for ``max_length``; its type from the
    annotation, its help (and choices, metavar) from the field's metadata."""
    option = flag(f.name)
    help_text = prefix + f.metadata.get("help", "").replace("%", "%%")
    extra = {k: f.metadata[k] for k in ("choices", "metavar") if k in f.metadata}
    typ = _flag_type(typ)
    if typ is bool:
        parser.add_argument(
            option, action=argparse.BooleanOptionalAction, default=default, help=help_text
        )
    elif typing.get_origin(typ) is list:
        parser.add_argument(
            option,
            type=lambda s: [x for x in s.split(",") if x],
            default=None if default is None else list(default),
            required=show_default and f.metadata.get("required", False),
            help=help_text + " (comma list)",
            **extra,
        )
    else:
        if show_default:
            help_text += f" (default: {default})"
        parser.add_argument(option, type=typ, default=default, help=help_text, **extra)


def _add_dataclass_flags(
    parser: argparse.ArgumentParser, cls, skip=frozenset(), defaults: bool = True
) -> None:
    """One flag per config field (but those in ``skip`` and those marked ``flag=False``):
    type and help come from the dataclass (single source of truth). ``defaults`` False: every
    flag defaults to None (not given), so that what it overrides stands."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.metadata.get("flag", True):
            continue
        default = f.default if defaults else None
        _add_field_flag(parser, f, hints[f.name], default, defaults)


def _add_setting_flags(parser, fn, names, prefix: str = "") -> None:
    """Flags for the settings ``names`` of the library function ``fn`` (`lorasum.settings`:
    type and help); each default is ``fn``'s, so the command and the function agree."""
    import inspect

    from lorasum.settings import SETTING_FIELDS, setting_types

    params, hints = inspect.signature(fn).parameters, setting_types()
    for name in names:
        f = SETTING_FIELDS[name]
        _add_field_flag(parser, f, hints[name], params[name].default, True, prefix)


def _library_kwargs(fn, args: argparse.Namespace, **given) -> dict:
    """``fn``'s keyword arguments from the parsed flags of the same names, and ``given``."""
    import inspect

    names = inspect.signature(fn).parameters
    return {**{n: getattr(args, n) for n in names if hasattr(args, n)}, **given}


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: what is wrong and where to look, not the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _add_train(sub) -> None:
    """`lorasum train`'s flags."""
    from lorasum.settings import TrainConfig

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
    _add_method_flags(c)


def _add_method_flags(parser) -> None:
    """``--method`` and one flag per merge-method option, from the options the registered
    methods declare (`lorasum.methods.options`); unset = None = the method's default."""
    from lorasum.methods import method_names
    from lorasum.methods.registry import all_options, option_help

    parser.add_argument(
        "--method",
        type=str,
        default=None,
        help=f"merge method (default sum): {', '.join(method_names())}",
    )
    for option in all_options():
        help_text = option_help(option).replace("%", "%%")
        parser.add_argument(option.flag, type=option.type, default=None, help=help_text)


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
    from lorasum.analysis.predict import predict_domains
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
    # with --domains: the rows and modules the gradients are measured on (match the studies)
    domain_settings = ("max_length", "max_train", "split_seed", "target_modules")
    _add_setting_flags(pr, predict_domains, domain_settings, prefix="with --domains: ")
    pr.add_argument(
        "--max-order",
        type=int,
        default=None,
        help="with --domains: combinations of at most this many domains",
    )
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
    from lorasum.evaluate import evaluate
    from lorasum.settings import EVAL_BATCH_SIZE

    e = sub.add_parser(
        "eval", help="answer-only perplexity (and task accuracy) of a model (and adapter) on data"
    )
    _add_setting_flags(e, evaluate, ("model",))
    e.add_argument("--adapter", default=None, help="PEFT LoRA adapter directory to apply")
    e.add_argument(
        "--data", nargs="+", required=True, help="data sources (builtin, .jsonl/.csv, hf:id)"
    )
    e.add_argument("--split", default="test", choices=["train", "val", "test"])
    e.add_argument(
        "--batch-size",
        type=int,
        default=EVAL_BATCH_SIZE,
        help=f"sequences per forward pass (default: {EVAL_BATCH_SIZE})",
    )
    _add_setting_flags(e, evaluate, ("max_length", "split_seed", "max_eval"))
    e.add_argument(
        "--full-sequence",
        dest="answer_only",
        action="store_false",
        help="count the whole sequence, not only the answer",
    )
    _add_setting_flags(e, evaluate, ("question_field", "answer_field", "choices_field"))
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
    _add_setting_flags(e, evaluate, ("precision", "device"))
    e.add_argument("--json", action="store_true", help="print JSON")


def _add_reproduce(sub) -> None:
    """`lorasum reproduce`'s flags: one per study setting (`StudyConfig`'s fields) and per
    training setting a study takes (`TrainConfig`'s), generated; then how the run runs."""
    from lorasum.settings import TrainConfig
    from lorasum.study.config import STUDY_TRAIN_EXCLUDED, StudyConfig, preset_names

    r = sub.add_parser(
        "reproduce", help="run the paper's study: train, sum, compare, correlate, report"
    )
    preset = next(f for f in dataclasses.fields(StudyConfig) if f.name == "preset")
    r.add_argument("--preset", default=None, choices=preset_names(), help=preset.metadata["help"])
    r.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="experiment file (YAML: model, domains, seeds, methods, train settings, ...); "
        "flags override it; the resolved settings are saved as experiment.yaml in --out",
    )
    r.add_argument("--out", required=True, help="study directory (results.json, report.md, png)")
    r.add_argument("--overwrite", action="store_true", help="replace a study with other settings")
    _add_dataclass_flags(r, StudyConfig, defaults=False)  # not given: the file's/preset's stands
    _add_run_flags(r)
    _add_dataclass_flags(r, TrainConfig, skip=set(STUDY_TRAIN_EXCLUDED), defaults=False)


def _add_run_flags(r) -> None:
    """`lorasum reproduce`'s flags of how the study runs (not settings: results do not depend
    on them): executor, plan, verify, wait."""
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

    from lorasum.io import ALLOW_PICKLE_ENV
    from lorasum.models.loading import TRUST_REMOTE_CODE_ENV

    if getattr(args, "allow_pickle", False):
        os.environ[ALLOW_PICKLE_ENV] = "1"
    if getattr(args, "trust_remote_code", False):
        os.environ[TRUST_REMOTE_CODE_ENV] = "1"


def _cmd_train(args: argparse.Namespace) -> int:
    """`lorasum train`."""
    from lorasum.settings import TrainConfig
    from lorasum.training.distributed import world_from_env
    from lorasum.training.loop import train

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
    from lorasum.methods.registry import all_options

    given = {o.name: getattr(args, o.name) for o in all_options()}
    config = MergeConfig("sum" if args.method is None else args.method, **given)  # None: not given
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

    result = evaluate(**_library_kwargs(evaluate, args, progress=not args.json))
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
    from lorasum.study.config import SETTING_NAMES
    from lorasum.study.reproduce import reproduce

    results = reproduce(
        args.out,
        config=args.config,
        overwrite=args.overwrite,
        executor=args.executor,
        ray_address=args.ray_address,
        plan_only=args.plan,
        verify=args.verify,
        wait=args.wait,
        **{name: getattr(args, name) for name in SETTING_NAMES},
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
    from lorasum.data.builtin import BUILTIN_DOMAINS, load_builtin
    from lorasum.models.loading import EMBEDDED_SHA256, embedded_gguf_path, prepare_default_model

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
