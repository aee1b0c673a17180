"""Settings defined once (`lorasum.settings`, `lorasum.study.config.StudyConfig`): TrainConfig is
the groups' fields and records and hashes exactly what it did before they existed; every setting
is one generated flag and one experiment-file key that reaches the study; no library function
restates a setting's default as a literal."""

from __future__ import annotations

import ast
import dataclasses
import json
import typing
from pathlib import Path

import pytest
import yaml

import lorasum
from lorasum.cli import build_parser
from lorasum.errors import LorasumError
from lorasum.io import config_key
from lorasum.settings import (
    GROUPS,
    SETTING_FIELDS,
    DataSettings,
    LoraSettings,
    RuntimeSettings,
    TrainConfig,
    field_problems,
    flag,
    group_of,
)
from lorasum.study.config import (
    EXPERIMENT_KEYS,
    SETTING_NAMES,
    STUDY_TRAIN_FIELDS,
    StudyConfig,
    resolve_study,
)


def test_train_config_is_the_groups_fields_flat():
    names = [f.name for g in GROUPS for f in dataclasses.fields(g)]
    assert len(names) == len(set(names)) == len(SETTING_FIELDS)  # no name in two groups
    hints = typing.get_type_hints(TrainConfig)
    assert sorted(hints) == sorted(names)
    for f in dataclasses.fields(TrainConfig):
        own = SETTING_FIELDS[f.name]
        assert dict(f.metadata) == dict(own.metadata), f.name  # help and check: the group's
        assert f.default == own.default and type(f.default) is type(own.default), f.name
        assert hints[f.name] == typing.get_type_hints(group_of(f.name))[f.name], f.name


# Recorded with the code before the settings groups (TrainConfig in train.py): lorasum.json's
# "config" (asdict, in its order) and the identity hashes that every adapter key starts from.
SAVED_DEFAULT = (
    '{"model": "default", "data": ["math"], "rank": 4, "alpha": 64.0, "dropout": 0.1, '
    '"target_modules": "auto", "lora_a": "trained", "a_slot": 0, "a_seed": 0, "epochs": 1.0, '
    '"max_steps": 0, "lr": 5e-05, "warmup_steps": 2, "weight_decay": 0.01, "batch_size": 8, '
    '"max_length": 128, "grad_clip": 1.0, "seed": 42, "split_seed": 42, "max_train": null, '
    '"max_eval": null, "answer_only": true, "question_field": null, "answer_field": null, '
    '"choices_field": null, "precision": "auto", "device": "auto", "eval_val": true, '
    '"snapshots": [], "stop_at": 0, "eval_every": 0, "patience": 3, "max_epochs": 0.0, '
    '"schedule": "linear"}'
)
IDENTITY_KEYS = [
    ({"data": ["math"]}, "d3827501996f8bba"),
    (
        {"data": ["math", "x.jsonl"], "rank": 8, "alpha": 16, "lr": 1e-3, "max_train": 32,
         "max_eval": 8, "snapshots": "2,4", "stop_at": 3},
        "3b4bf5c1046b4c3f",
    ),
    (
        {"data": ["a"], "lora_a": "disjoint", "a_slot": 2, "a_seed": 1, "eval_every": 2,
         "patience": 2, "max_epochs": 3.0, "schedule": "constant"},
        "583b4fa58fc391a1",
    ),
    (
        {"data": ["a"], "lora_a": "frozen", "answer_only": False, "precision": "bf16",
         "device": "cpu", "choices_field": "c"},
        "cf3d2c5701a4a7fa",
    ),
]  # fmt: skip


def test_saved_config_and_keys_are_those_of_before():
    assert json.dumps(dataclasses.asdict(TrainConfig(data=["math"]))) == SAVED_DEFAULT
    for settings, key in IDENTITY_KEYS:
        assert config_key(TrainConfig(**settings).identity()) == key, settings


def test_each_group_checks_its_own_fields():
    with pytest.raises(LorasumError, match="--max-length must be >= 8"):
        DataSettings(data=["math"], max_length=4)
    with pytest.raises(LorasumError, match="--a-slot and --a-seed apply to --lora-a disjoint"):
        LoraSettings(a_slot=1)
    assert field_problems({"precision": "fp8", "max_eval": None, "rank": 0}) == [
        "--precision 'fp8': use auto, bf16 or fp32",
        "--rank must be >= 1",
    ]
    # a TrainConfig reports every group's problems at once, on one line
    with pytest.raises(LorasumError) as e:
        TrainConfig(data=[], rank=0, lr=0, epochs=0, precision="fp8")
    msg = str(e.value)
    for part in ("no data", "--rank", "--lr", "--epochs > 0", "--precision 'fp8'"):
        assert part in msg, part
    assert "\n" not in msg


def _subcommand(name: str):
    parser = build_parser()
    return next(a for a in parser._actions if a.dest == "command").choices[name]


def _flags(command) -> dict[str, list[str]]:
    """dest → the option strings that set it (``--x`` and ``--no-x`` count as one flag)."""
    out: dict[str, list[str]] = {}
    for action in command._actions:
        plain = [s for s in action.option_strings if not s.startswith("--no-")]
        out.setdefault(action.dest, []).extend(plain)
    return out


def test_every_train_setting_is_one_flag():
    flags = _flags(_subcommand("train"))
    for f in dataclasses.fields(TrainConfig):
        # answer_only also has --full-sequence, the name `lorasum train` has always had
        extra = ["--full-sequence"] if f.name == "answer_only" else []
        assert sorted(flags[f.name]) == sorted([flag(f.name), *extra]), f.name


def test_every_study_setting_is_one_flag():
    flags = _flags(_subcommand("reproduce"))
    study = [f.name for f in dataclasses.fields(StudyConfig) if f.name != "train"]
    for name in (*study, *STUDY_TRAIN_FIELDS):
        assert flags[name] == [flag(name)], name
    assert set(SETTING_NAMES) == {*study, *STUDY_TRAIN_FIELDS}
    assert {f.name for f in dataclasses.fields(StudyConfig)} == EXPERIMENT_KEYS
    # the flags that are not settings say how a run runs; none is a forgotten setting
    run = {"help", "config", "out", "overwrite", "executor", "ray_address", "plan", "verify"}
    run |= {"wait", "allow_pickle", "trust_remote_code"}
    assert set(flags) - set(SETTING_NAMES) == run


# One value per experiment-file key, none of them the default: each must reach the StudyConfig
# (a key read by nobody would leave the default). Two files, for settings that exclude each other.
NOT_DEFAULT = [
    {
        "model": "some/model",
        "domains": {"a": "math", "b": "medicine", "c": "finance"},
        "seeds": [1, 7],
        "seed_per_domain": True,
        "max_order": 2,
        "sample": 1,
        "sample_seed": 3,
        "methods": {"sum": {}, "ties": {"density": 0.5}},
        "routes": ["oracle"],
        "cross_domain": False,
        "paper_variants": False,
        "predictors": False,
        "workers": 2,
        "snapshots": [0.5, 1.0],
        "metrics": ["perplexity", "accuracy"],
        "train": {"rank": 8, "lora_a": "frozen"},
        "equal_params": True,
    },
    {"preset": "tiny", "budget": "converged", "merge_aware": True},
]


def test_every_experiment_key_reaches_the_study(tmp_path):
    assert set().union(*NOT_DEFAULT) == EXPERIMENT_KEYS
    for i, settings in enumerate(NOT_DEFAULT):
        path = tmp_path / f"exp{i}.yaml"
        path.write_text(yaml.safe_dump(settings))
        study = resolve_study(None, path)
        for key, value in settings.items():
            got = getattr(study, key)
            assert (got.items() >= value.items()) if key == "train" else got == value, key


def _as_flag(value) -> list[str]:
    if isinstance(value, dict):
        return [",".join(f"{k}={v}" for k, v in value.items())]
    if isinstance(value, list):
        return [",".join(str(v) for v in value)]
    return [str(value)]


def test_every_study_flag_reaches_the_study():
    """The same settings as flags: each flag sets its setting (methods as names)."""
    for settings in NOT_DEFAULT:
        settings = {k: v for k, v in settings.items() if k not in ("preset", "methods", "train")}
        argv = ["reproduce", "--out", "x"]
        for key, value in settings.items():
            if isinstance(value, bool):
                argv.append(flag(key) if value else f"--no-{key.replace('_', '-')}")
            else:
                argv += [flag(key), *_as_flag(value)]
        argv += ["--methods", "ties", "--rank", "8", "--lora-a", "frozen"]
        args = build_parser().parse_args(argv)
        study = resolve_study("tiny", None, {n: getattr(args, n) for n in SETTING_NAMES})
        for key, value in settings.items():
            assert getattr(study, key) == value, key
        assert list(study.methods) == ["sum", "ties"]
        assert (study.train["rank"], study.train["lora_a"]) == (8, "frozen")


# --- each default in one place -------------------------------------------------------------------


def restated_defaults(source: str, where: str) -> list[str]:
    """Parameters named like a setting whose default is that setting's default written again
    as a literal (None and other values are a function's own choice, not a restatement)."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        a = node.args
        positional = a.posonlyargs + a.args
        pairs = list(zip(positional[len(positional) - len(a.defaults) :], a.defaults, strict=True))
        pairs += [(x, d) for x, d in zip(a.kwonlyargs, a.kw_defaults, strict=True) if d is not None]
        for arg, default in pairs:
            f = SETTING_FIELDS.get(arg.arg)
            if f is None or not isinstance(default, ast.Constant) or default.value is None:
                continue
            if default.value == f.default and type(default.value) is type(f.default):
                out.append(f"{where}: {node.name}({arg.arg}={default.value!r})")
    return out


def test_no_function_restates_a_settings_default():
    root = Path(lorasum.__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        if path.name != "settings.py":
            found += restated_defaults(path.read_text(), str(path.relative_to(root)))
    assert found == []


def test_the_restatement_check_finds_planted_ones():
    planted = (
        "def evaluate(max_length=128, split_seed=42, max_eval=None, batch_size=16):\n"
        "    pass\n"
        "def f(*, precision='auto', device='cpu', answer_only=True, rank=4.0):\n"
        "    pass\n"
    )
    assert restated_defaults(planted, "x.py") == [
        "x.py: evaluate(max_length=128)",
        "x.py: evaluate(split_seed=42)",
        "x.py: f(precision='auto')",
        "x.py: f(answer_only=True)",
    ]


def test_the_commands_and_functions_take_the_settings_defaults():
    import inspect

    from lorasum.analysis.calibration import DEFAULT_MAX_LENGTH, DEFAULT_SPLIT_SEED
    from lorasum.analysis.predict import predict_domains
    from lorasum.evaluate import evaluate

    parser = build_parser()
    ev = parser.parse_args(["eval", "--data", "math"])
    pr = parser.parse_args(["predict", "--domains", "a,b"])
    for fn, args, names in (
        (evaluate, ev, ("model", "max_length", "split_seed", "max_eval", "precision", "device")),
        (predict_domains, pr, ("max_length", "split_seed", "target_modules")),
    ):
        params = inspect.signature(fn).parameters
        for name in names:
            default = getattr(group_of(name), name)
            assert params[name].default == default == getattr(args, name), (fn.__name__, name)
    # where a function's default is its own (predict's rows per domain), the flag is the same
    assert pr.max_train == inspect.signature(predict_domains).parameters["max_train"].default
    assert DataSettings.max_length == DEFAULT_MAX_LENGTH
    assert DataSettings.split_seed == DEFAULT_SPLIT_SEED
    assert RuntimeSettings.precision == TrainConfig.precision == "auto"


def _identity_before(study: StudyConfig, train: dict, version: str) -> dict:
    """The study identity as `reproduce.resolve` wrote it out by hand before the key marks."""
    identity = {
        "preset": study.preset,
        "model": study.model,
        "domains": study.domains,
        "train": train,
        "seeds": study.seeds,
        "seed_per_domain": study.seed_per_domain,
        "version": version,
    }
    if study.max_order is not None:
        identity["max_order"] = study.max_order
    if study.budget != "epochs":
        identity["budget"] = study.budget
    if study.snapshots:
        identity["snapshots"] = study.snapshots
    if study.merge_aware:
        identity["merge_aware"] = True
    if study.equal_params:
        identity["equal_params"] = True
    return identity


def test_the_study_key_is_that_of_before(tmp_path):
    from lorasum.study.config import study_identity

    studies = [StudyConfig(), resolve_study("tiny")]
    for i, settings in enumerate(NOT_DEFAULT):
        path = tmp_path / f"exp{i}.yaml"
        path.write_text(yaml.safe_dump(settings))
        studies.append(resolve_study(None, path))
    train = {"rank": 4}
    for study in studies:
        want = _identity_before(study, train, "9.9")
        assert config_key(study_identity(study, train, "9.9")) == config_key(want)
