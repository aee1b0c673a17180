"""The bad-input catalogue: every mistake a user can make ends in one line, exit 2, no writes.

Each row is (id, setup, pattern): ``setup(w, d)`` builds the bad input inside the case's own
directory ``d`` (the shared tiny models, adapters and data in ``w`` are never modified) and
returns the command line. The check is the same for every row: ``lorasum`` exits with code 2,
stderr is exactly one line ``lorasum: error: …`` that names the problem (``pattern``) and says
what to do, and no file under ``d`` or ``w`` is created, changed or removed.

"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import make_adapter
from safetensors.torch import load_file, save_file

from lorasum.cli import main
from lorasum.methods import method_names

# --------------------------------------------------------------------------------------------
# The shared world: tiny models, three adapters, clean data (session scope, read-only).


@dataclass
class World:
    root: Path
    llama: Path
    gpt2: Path
    a: Path  # llama adapter
    b: Path  # llama adapter, other seed
    g: Path  # gpt2 adapter (Conv1D, fan_in_fan_out)
    data: Path  # clean QA jsonl
    data2: Path  # another clean QA jsonl


@pytest.fixture(scope="module")
def world(tiny_llama, tiny_gpt2, qa_files, tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("catalogue-world")
    a = make_adapter(tiny_llama, root / "a", seed=1)
    b = make_adapter(tiny_llama, root / "b", seed=2)
    g = make_adapter(tiny_gpt2, root / "g", seed=3)
    data = root / "qa.jsonl"
    shutil.copy(qa_files["arith"], data)
    data2 = root / "qa2.jsonl"
    shutil.copy(qa_files["colors"], data2)
    return World(root, tiny_llama, tiny_gpt2, a, b, g, data, data2)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(path: Path, **changes) -> Path:
    cfg = json.loads((path / "adapter_config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return path


def _edit_tensors(path: Path, fn: Callable[[dict], dict]) -> Path:
    w = path / "adapter_model.safetensors"
    tensors = fn(dict(load_file(str(w))))
    save_file(tensors, str(w))
    return path


def _first_lora(tensors: dict, part: str = "lora_A") -> str:
    return sorted(k for k in tensors if part in k)[0]


def _poison(value: float) -> Callable[[dict], dict]:
    def fn(t: dict) -> dict:
        k = _first_lora(t)
        t[k] = t[k].clone()
        t[k][0, 0] = value
        return t

    return fn


def bad_adapter(w: World, d: Path, mutate: Callable[[Path], object], src: str = "a") -> Path:
    path = _copy(getattr(w, src), d / "bad")
    mutate(path)
    return path


def compose_with(bad: Callable[[Path], object], src: str = "a"):
    """A compose row: a good adapter plus a copy of ``src`` changed by ``bad``."""

    def setup(w: World, d: Path) -> list[str]:
        return ["compose", str(w.b), str(bad_adapter(w, d, bad, src)), "--out", str(d / "out")]

    return setup


def train_on(rows_text: str | bytes, suffix: str = ".jsonl", *extra: str):
    """A train row on a data file holding ``rows_text``."""

    def setup(w: World, d: Path) -> list[str]:
        f = d / f"data{suffix}"
        if isinstance(rows_text, bytes):
            f.write_bytes(rows_text)
        else:
            f.write_text(rows_text)
        return [
            "train",
            "--model",
            str(w.llama),
            "--data",
            str(f),
            "--out",
            str(d / "out"),
            "--max-steps",
            "1",
            "--precision",
            "fp32",
            *extra,
        ]

    return setup


def train_args(*extra: str):
    def setup(w: World, d: Path) -> list[str]:
        return ["train", "--model", str(w.llama), "--data", str(w.data), "--out", str(d / "o")] + [
            *extra
        ]

    return setup


def eval_args(*extra: str, adapter: str | None = None):
    def setup(w: World, d: Path) -> list[str]:
        args = ["eval", "--model", str(w.llama), "--data", str(w.data), "--precision", "fp32"]
        if adapter:
            args += ["--adapter", str(getattr(w, adapter))]
        return args + [*extra]

    return setup


def compose_args(*extra: str):
    def setup(w: World, d: Path) -> list[str]:
        return ["compose", str(w.a), str(w.b), "--out", str(d / "out"), *extra]

    return setup


def reproduce_args(*extra: str, data: Path | None = None):
    def setup(w: World, d: Path) -> list[str]:
        src, src2 = (data or w.data), w.data2
        return [
            "reproduce",
            "--preset",
            "tiny",
            "--model",
            str(w.llama),
            "--domains",
            f"x={src},y={src2}",
            "--out",
            str(d / "study"),
            *extra,
        ]

    return setup


QA_LINE = json.dumps({"question": "What is 1 plus 1?", "answer": "2"}) + "\n"
LONG_ANSWER = "word " * 400


def _pickle_only(path: Path) -> None:
    tensors = load_file(str(path / "adapter_model.safetensors"))
    torch.save(tensors, path / "adapter_model.bin")
    (path / "adapter_model.safetensors").unlink()


def _truncate(path: Path) -> None:
    f = path / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _garbage(path: Path) -> None:
    (path / "adapter_model.safetensors").write_bytes(os.urandom(4096))


def _int_weights(t: dict) -> dict:
    return {k: (v * 100).to(torch.int32) for k, v in t.items()}


def _embedding_lora(t: dict) -> dict:
    t["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.randn(4, 320)
    return t


def _drop_a(t: dict) -> dict:
    return {k: v for k, v in t.items() if k != _first_lora(t)}


def _no_base(path: Path) -> None:
    _edit_config(path, base_model_name_or_path=None)


def _mixed_layout(w: World, d: Path) -> list[str]:
    g2 = bad_adapter(w, d, lambda p: _edit_config(p, fan_in_fan_out=False), src="g")
    return ["compose", str(w.g), str(g2), "--out", str(d / "out")]


def _two_architectures(w: World, d: Path) -> list[str]:
    llama = _copy(w.a, d / "llama")
    gpt2 = _copy(w.g, d / "gpt2")
    _no_base(llama), _no_base(gpt2)
    return ["compose", str(llama), str(gpt2), "--out", str(d / "out")]


def _shape_mismatch(w: World, d: Path) -> list[str]:
    # an adapter whose base model is not the one evaluated: ΔW shapes do not fit
    return ["eval", "--model", str(w.gpt2), "--data", str(w.data), "--adapter", str(w.a)]


def _existing_result(w: World, d: Path) -> list[str]:
    other = d / "out"
    assert main(["compose", str(w.a), "--out", str(other)]) == 0
    return ["compose", str(w.a), str(w.b), "--out", str(other)]


def _out_is_file(w: World, d: Path) -> list[str]:
    (d / "out").write_text("mine")
    return ["compose", str(w.a), str(w.b), "--out", str(d / "out")]


def _foreign_dir(w: World, d: Path) -> list[str]:
    (d / "mine").mkdir()
    (d / "mine" / "notes.txt").write_text("keep")
    return [*train_args("--max-steps", "1")(w, d)[:-3], str(d / "mine"), "--overwrite"]


def _out_inside_input(w: World, d: Path) -> list[str]:
    a = _copy(w.a, d / "a")
    return ["compose", str(a), str(w.b), "--out", str(a / "sum")]


def _out_is_input(w: World, d: Path) -> list[str]:
    a = _copy(w.a, d / "a")
    return ["compose", str(a), str(w.b), "--out", str(a), "--overwrite"]


def _one_gb_line(w: World, d: Path) -> list[str]:
    f = d / "huge.jsonl"
    with open(f, "wb") as fh:  # sparse: a 1-GB line without using 1 GB of disk
        fh.write(b'{"question": "')
        fh.truncate(1 << 30)
    return train_on("")(w, d)[:4] + [str(f)] + train_on("")(w, d)[5:]


def _long_answers_eval(w: World, d: Path) -> list[str]:
    f = d / "long.jsonl"
    f.write_text(
        "".join(json.dumps({"question": f"q{i}", "answer": LONG_ANSWER}) + "\n" for i in range(20))
    )
    return [
        "eval",
        "--model",
        str(w.llama),
        "--data",
        str(f),
        "--max-length",
        "16",
        "--precision",
        "fp32",
    ]


def _similarity_mixed(w: World, d: Path) -> list[str]:
    llama = _copy(w.a, d / "llama")
    gpt2 = _copy(w.g, d / "gpt2")
    _no_base(llama), _no_base(gpt2)
    return ["similarity", str(llama), str(gpt2)]


def _similarity_plot_into_file(w: World, d: Path) -> list[str]:
    (d / "plots").write_text("mine")
    return ["similarity", str(w.a), str(w.b), "--plot", str(d / "plots")]


def _reproduce_foreign(w: World, d: Path) -> list[str]:
    (d / "study").mkdir()
    (d / "study" / "notes.txt").write_text("keep")
    return reproduce_args()(w, d)


def _reproduce_bad_data(w: World, d: Path) -> list[str]:
    f = d / "bad.jsonl"
    f.write_text(QA_LINE + "{oops\n")
    return reproduce_args(data=f)(w, d)


def _unknown_method(w: World, d: Path) -> list[str]:
    return compose_args("--method", "nope")(w, d)


CASES: list[tuple[str, Callable[[World, Path], list[str]], str]] = [
    # --- adapters ----------------------------------------------------------------------------
    (
        "adapter-missing-dir",
        lambda w, d: ["compose", str(w.a), str(d / "nope"), "--out", str(d / "o")],
        "not a directory",
    ),
    (
        "adapter-no-config",
        compose_with(lambda p: (p / "adapter_config.json").unlink()),
        "no adapter_config.json",
    ),
    (
        "adapter-no-weights",
        compose_with(lambda p: (p / "adapter_model.safetensors").unlink()),
        "no adapter_model.safetensors",
    ),
    ("adapter-truncated-safetensors", compose_with(_truncate), "corrupt or unreadable"),
    ("adapter-corrupt-safetensors", compose_with(_garbage), "corrupt or unreadable"),
    (
        "adapter-int-dtype",
        compose_with(lambda p: _edit_tensors(p, _int_weights)),
        "not floating point",
    ),
    ("adapter-nan", compose_with(lambda p: _edit_tensors(p, _poison(float("nan")))), "NaN/inf"),
    ("adapter-inf", compose_with(lambda p: _edit_tensors(p, _poison(float("inf")))), "NaN/inf"),
    ("adapter-lora-a-only", compose_with(lambda p: _edit_tensors(p, _drop_a)), "lora_B only"),
    (
        "adapter-rank-mismatch",
        compose_with(lambda p: _edit_config(p, r=8)),
        "rank 4 but the config says 8",
    ),
    ("adapter-shapes-do-not-fit-base", _shape_mismatch, "does not fit model"),
    ("adapter-dora", compose_with(lambda p: _edit_config(p, use_dora=True)), "DoRA"),
    ("adapter-lora-bias", compose_with(lambda p: _edit_config(p, lora_bias=True)), "bias"),
    (
        "adapter-modules-to-save",
        compose_with(lambda p: _edit_config(p, modules_to_save=["lm_head"])),
        "modules_to_save",
    ),
    (
        "adapter-embedding-lora",
        compose_with(lambda p: _edit_tensors(p, _embedding_lora)),
        "embedding LoRA",
    ),
    ("adapter-pickle-only", compose_with(_pickle_only), "pickle checkpoint.*--allow-pickle"),
    (
        "adapter-pickle-only-eval",
        lambda w, d: eval_args()(w, d) + ["--adapter", str(bad_adapter(w, d, _pickle_only))],
        "--allow-pickle",
    ),
    (
        "adapter-config-not-json",
        compose_with(lambda p: (p / "adapter_config.json").write_text("{oops")),
        "not valid JSON",
    ),
    (
        "adapter-config-not-lora",
        compose_with(lambda p: (p / "adapter_config.json").write_text('{"hello": "world"}')),
        "not a PEFT adapter config",
    ),
    (
        "adapter-config-ia3",
        compose_with(lambda p: _edit_config(p, peft_type="IA3")),
        "not a LoRA adapter",
    ),
    ("adapter-config-bad-rank", compose_with(lambda p: _edit_config(p, r="four")), "invalid value"),
    (
        "adapters-two-base-models",
        lambda w, d: ["compose", str(w.a), str(w.g), "--out", str(d / "o")],
        "different base models",
    ),
    ("adapters-two-architectures", _two_architectures, "different model architectures"),
    ("adapters-mixed-fan-in-fan-out", _mixed_layout, "fan_in_fan_out"),
    ("similarity-two-architectures", _similarity_mixed, "different model architectures"),
    ("similarity-one-adapter", lambda w, d: ["similarity", str(w.a)], "at least two"),
    (
        "similarity-nan-adapter",
        lambda w, d: [
            "similarity",
            str(w.a),
            str(bad_adapter(w, d, lambda p: _edit_tensors(p, _poison(float("nan"))))),
        ],
        "NaN/inf",
    ),
    ("similarity-plot-is-a-file", _similarity_plot_into_file, "is a file"),
    # --- data --------------------------------------------------------------------------------
    (
        "data-malformed-jsonl",
        train_on(QA_LINE + QA_LINE + "{oops\n"),
        r"data\.jsonl:3: malformed JSON",
    ),
    (
        "data-not-an-object",
        train_on(QA_LINE + "[1, 2]\n"),
        r"data\.jsonl:2: expected a JSON object",
    ),
    (
        "data-missing-field",
        train_on(QA_LINE + json.dumps({"question": "q"}) + "\n"),
        r"data\.jsonl:2: missing field 'answer'",
    ),
    ("data-no-known-fields", train_on(json.dumps({"x": "q", "y": "a"}) + "\n"), "--question-field"),
    ("data-empty", train_on(""), "no usable rows"),
    (
        "data-blank-answers",
        train_on(json.dumps({"question": "q", "answer": " "}) + "\n"),
        "no usable rows",
    ),
    (
        "data-not-utf8",
        train_on(QA_LINE.encode() + b'{"question": "caf\xe9", "answer": "x"}\n'),
        "not UTF-8",
    ),
    ("data-csv-without-columns", train_on("foo,bar\n1,2\n", ".csv"), "--question-field"),
    (
        "data-csv-extra-cells",
        train_on("question,answer\nq,a,extra\n", ".csv"),
        r"data\.csv:2: more cells",
    ),
    (
        "data-question-is-a-list",
        train_on(json.dumps({"question": ["a", "b"], "answer": "x"}) + "\n"),
        r"field 'question' is list",
    ),
    (
        "data-question-is-a-number",
        train_on(json.dumps({"question": 12, "answer": "x"}) + "\n"),
        r"field 'question' is int",
    ),
    (
        "data-answers-longer-than-max-length",
        train_on(
            "".join(
                json.dumps({"question": f"q{i}", "answer": LONG_ANSWER}) + "\n" for i in range(20)
            ),
            ".jsonl",
            "--max-length",
            "16",
        ),
        "raise --max-length",
    ),
    ("data-answers-longer-than-max-length-eval", _long_answers_eval, "raise --max-length"),
    ("data-one-gb-line", _one_gb_line, "line longer than"),
    (
        "data-missing-file",
        lambda w, d: eval_args()(w, d)[:4] + [str(d / "nope.jsonl")] + eval_args()(w, d)[5:],
        "does not exist",
    ),
    ("data-unsupported-format", train_on("q,a", ".txt"), "unsupported format"),
    (
        "data-unknown-domain",
        lambda w, d: [
            "train",
            "--model",
            str(w.llama),
            "--data",
            "astrology",
            "--out",
            str(d / "o"),
        ],
        "unknown data source",
    ),
    (
        "data-repeated-source",
        lambda w, d: train_args()(w, d)[:4] + [f"{w.data},{w.data}"] + train_args()(w, d)[5:],
        "repeat",
    ),
    ("data-bad-field-name", eval_args("--question-field", "nope"), "no field 'nope'"),
    (
        "data-malformed-in-eval",
        lambda w, d: (
            eval_args()(w, d)[:4] + [str(_write(d / "e.jsonl", "{oops\n"))] + eval_args()(w, d)[5:]
        ),
        r"e\.jsonl:1: malformed JSON",
    ),
    ("data-malformed-in-reproduce", _reproduce_bad_data, r"bad\.jsonl:2: malformed JSON"),
    # --- options -----------------------------------------------------------------------------
    ("train-rank-0", train_args("--rank", "0"), "--rank must be >= 1"),
    ("train-alpha-negative", train_args("--alpha", "-1"), "--alpha must be > 0"),
    ("train-dropout-1", train_args("--dropout", "1.5"), "--dropout must be in"),
    ("train-lr-0", train_args("--lr", "0"), "--lr must be > 0"),
    ("train-batch-size-0", train_args("--batch-size", "0"), "--batch-size must be >= 1"),
    ("train-max-length-4", train_args("--max-length", "4"), "--max-length must be >= 8"),
    ("train-epochs-0", train_args("--epochs", "0"), "--epochs > 0"),
    ("train-max-steps-negative", train_args("--max-steps", "-1", "--epochs", "0"), "--max-steps"),
    ("train-max-train-0", train_args("--max-train", "0"), "--max-train must be >= 1"),
    ("train-precision-unknown", train_args("--precision", "fp8"), "--precision 'fp8'"),
    (
        "train-unknown-model",
        lambda w, d: [
            "train",
            "--model",
            str(d / "no-model"),
            "--data",
            str(w.data),
            "--out",
            str(d / "o"),
        ],
        "cannot load model",
    ),
    (
        "train-unknown-target",
        train_args("--target-modules", "nope_proj", "--max-steps", "1"),
        "not found in the model",
    ),
    ("train-unknown-device", train_args("--device", "tpu9", "--max-steps", "1"), "unknown device"),
    ("eval-batch-size-0", eval_args("--batch-size", "0"), "--batch-size must be >= 1"),
    ("eval-max-eval-0", eval_args("--max-eval", "0"), "--max-eval must be >= 1"),
    ("eval-max-length-2", eval_args("--max-length", "2"), "--max-length must be >= 8"),
    (
        "eval-unknown-model",
        lambda w, d: ["eval", "--model", str(d / "none"), "--data", str(w.data)],
        "cannot load model",
    ),
    ("compose-unknown-method", _unknown_method, "unknown merge method 'nope'"),
    ("compose-weights-count", compose_args("--weights", "1"), "1 values for 2 adapters"),
    ("compose-weights-not-numbers", compose_args("--weights", "1,x"), "expected numbers"),
    ("compose-weights-nan", compose_args("--weights", "1,nan"), "finite"),
    ("compose-weights-overflow", compose_args("--weights", "1e300,1"), "NaN/inf"),
    ("compose-svd-rank-0", compose_args("--method", "svd", "--rank", "0"), "rank"),
    (
        "compose-svd-keep-2",
        compose_args("--method", "svd", "--rank", "auto", "--keep", "2"),
        "keep",
    ),
    ("compose-ties-density-2", compose_args("--method", "ties", "--density", "2"), "density"),
    ("compose-option-not-read", compose_args("--density", "0.5"), "density"),
    ("compose-pad-rank-too-small", compose_args("--pad-rank-to", "2"), "pad"),
    ("compose-calibration-not-used", compose_args("--calibration", "own", "own"), "calibration"),
    ("compose-out-inside-input", _out_inside_input, "overlaps the input adapter"),
    ("compose-out-is-input", _out_is_input, "overlaps the input adapter"),
    (
        "compose-merge-into-input",
        lambda w, d: (
            compose_args("--merge-into-base", str(_copy(w.a, d / "a")))(w, d)[:1]
            + [
                str(d / "a"),
                str(w.b),
                "--out",
                str(d / "o"),
                "--merge-into-base",
                str(d / "a" / "m"),
            ]
        ),
        "overlaps the input adapter",
    ),
    (
        "reproduce-unknown-domain",
        lambda w, d: [
            "reproduce",
            "--model",
            str(w.llama),
            "--domains",
            "astrology,math",
            "--out",
            str(d / "s"),
        ],
        "astrology",
    ),
    ("reproduce-max-order-1", reproduce_args("--max-order", "1"), "--max-order 1"),
    ("reproduce-workers-0", reproduce_args("--workers", "0"), "--workers 0"),
    ("reproduce-seeds-repeat", reproduce_args("--seeds", "1,1"), "repeats a seed"),
    ("reproduce-rank-0", reproduce_args("--rank", "0"), "--rank must be >= 1"),
    ("reproduce-foreign-dir", _reproduce_foreign, "holds no lorasum study"),
    # --- outputs -----------------------------------------------------------------------------
    ("output-existing-different-result", _existing_result, "already holds a different result"),
    ("output-is-a-file", _out_is_file, "exists and is a file"),
    ("output-foreign-dir-overwrite", _foreign_dir, "did not write"),
]
# every merge method refuses a mismatched weight count (or weights it does not take) alike
NEEDS = {
    "svd": ["--rank", "4"],
    **{
        m: ["--density", "0.5"]
        for m in ("ties", "magnitude_prune", "dare_linear", "dare_ties", "knots_ties")
    },
}
CASES += [
    (
        f"compose-{m}-weights-count",
        compose_args("--method", m, *NEEDS.get(m, []), "--weights", "1,1,1"),
        "weight",
    )
    for m in method_names()
]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _with_results(text: str, command: Callable[[World, Path, Path], list[str]]):
    """A row whose run directory holds ``text`` as results.json."""

    def setup(w: World, d: Path) -> list[str]:
        (d / "run").mkdir()
        _write(d / "run" / "results.json", text)
        return command(w, d, d / "run")

    return setup


def _with_config(text: str, *extra: str):
    """A reproduce row on an experiment file holding ``text``."""

    def setup(w: World, d: Path) -> list[str]:
        return [*reproduce_args(*extra)(w, d), "--config", str(_write(d / "exp.yaml", text))]

    return setup


def _predict(w: World, d: Path, run: Path) -> list[str]:
    return ["predict", str(w.a), str(w.b), "--fit", str(run)]


def _report(w: World, d: Path, run: Path) -> list[str]:
    return ["report", str(run)]


# predict, report and experiment files (commands that landed after the rows above)
CASES += [
    ("predict-one-adapter", lambda w, d: ["predict", str(w.a)], "at least two adapters"),
    (
        "predict-fit-dir-without-results",
        lambda w, d: ["predict", str(w.a), str(w.b), "--fit", str(d)],
        "no results.json",
    ),
    ("predict-fit-invalid-results", _with_results("{", _predict), "cannot read"),
    ("compose-fit-without-check", compose_args("--fit", "."), "--fit applies to --check"),
    ("report-missing-dir", lambda w, d: ["report", str(d / "nope")], "no results.json"),
    ("report-invalid-json", _with_results("{", _report), "not valid JSON"),
    ("report-not-a-study", _with_results("[]", _report), "not a lorasum study"),
    (
        "reproduce-config-missing",
        lambda w, d: [*reproduce_args()(w, d), "--config", str(d / "missing.yaml")],
        "no such file",
    ),
    ("reproduce-config-bad-yaml", _with_config("domains: [x\n"), "not valid YAML"),
    ("reproduce-config-unknown-key", _with_config("domians: [x]\n"), "'domians'"),
    (
        "reproduce-config-train-type",
        _with_config("train: {rank: four, colour: blue}\n"),
        "'colour'.*train.rank",
    ),
    ("reproduce-unknown-method", reproduce_args("--methods", "nosuch"), "nosuch"),
    (
        "reproduce-calibrated-fraction",
        _with_config("methods: {calibrated: {fraction: 2}}\n"),
        "share in",
    ),
]


def snapshot(*roots: Path) -> dict[str, tuple]:
    """Every file and directory under the roots: kind, mode and content hash."""
    out = {}
    for root in roots:
        for p in [root, *root.rglob("*")]:
            st = p.lstat()
            if p.is_file() and st.st_size > (64 << 20):  # the sparse 1-GB file: size + mtime
                out[str(p)] = ("big", st.st_size, st.st_mtime_ns)
            elif p.is_file():
                out[str(p)] = ("f", st.st_mode, hashlib.sha256(p.read_bytes()).hexdigest())
            else:
                out[str(p)] = ("d", st.st_mode)
    return out


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    monkeypatch.setenv("LORASUM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LORASUM_ALLOW_PICKLE", "0")  # restored after main() sets it
    monkeypatch.setenv("LORASUM_TRUST_REMOTE_CODE", "0")


def run_case(argv: list[str], capsys) -> str:
    capsys.readouterr()
    code = main(argv)
    # progress bars (tqdm, on stderr while a unit runs) are not messages
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "%|" not in line]
    assert code == 2, f"exit {code}, stderr {err}"
    assert len(err) == 1 and err[0].startswith("lorasum: error: "), err
    return err[0][len("lorasum: error: ") :]


def says_what_to_do(message: str) -> bool:
    hints = (
        "pass ",
        "use ",
        "choose",
        "re-save",
        "fix",
        "raise",
        "give ",
        "space",
        "convert",
        "re-train",
        "compose adapters",
        "check the path",
        "write ",
        "lower",
        "free ",
        "set ",
        "must be",
        "expected",
        "needs",
        "adapt ",
        "only",
        "save ",
        "applies to",
        "at least",
        "check ",
        "rerun",
    )
    return any(h in message for h in hints)


@pytest.mark.parametrize(("setup", "pattern"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(world, setup, pattern, tmp_path, capsys):
    import re

    d = tmp_path / "case"
    d.mkdir()
    argv = setup(world, d)
    before = snapshot(d, world.root)
    message = run_case(argv, capsys)
    assert re.search(pattern, message), message
    assert says_what_to_do(message), f"no fix in: {message}"
    assert snapshot(d, world.root) == before


def test_catalogue_size():
    assert len(CASES) >= 40


# --- outputs that fail while writing: read-only place, full disk ----------------------------


def _fail_with(err: int):
    def fn(*args, **kwargs):
        raise OSError(err, os.strerror(err))

    return fn


@pytest.mark.parametrize(
    ("command", "err"),
    [
        ("compose", errno.EACCES),
        ("compose", errno.ENOSPC),
        ("train", errno.ENOSPC),
        ("similarity", errno.EROFS),
        ("reproduce", errno.EACCES),
    ],
)
def test_unwritable_or_full_output_is_one_line_and_leaves_nothing(
    world, command, err, tmp_path, capsys, monkeypatch
):
    """A read-only directory (root ignores chmod, so its refusal is simulated) or a full disk
    (a patched write, as on a tiny tmpfs): one line, exit 2, no temp files left behind."""
    import lorasum.io as lio

    d = tmp_path / "case"
    d.mkdir()
    if command == "compose":
        argv = compose_args()(world, d)
    elif command == "train":
        argv = train_args("--max-steps", "1", "--precision", "fp32", "--no-eval-val")(world, d)
    elif command == "similarity":
        argv = ["similarity", str(world.a), str(world.b), "--plot", str(d / "plots")]
    else:
        argv = reproduce_args("--max-train", "4", "--max-eval", "2")(world, d)
    before = snapshot(world.root)
    if err == errno.ENOSPC:  # the disk fills up while the output's files are being written
        import safetensors.torch

        monkeypatch.setattr(safetensors.torch, "save_file", _fail_with(err))
        monkeypatch.setattr(lio.tempfile, "mkstemp", _fail_with(err))
    else:  # the output's directory refuses new entries
        monkeypatch.setattr(lio.tempfile, "mkdtemp", _fail_with(err))
        monkeypatch.setattr(lio.tempfile, "mkstemp", _fail_with(err))
    message = run_case(argv, capsys)
    assert "cannot write" in message and ("writable" in message or "space" in message)
    assert snapshot(world.root) == before
    assert list(d.iterdir()) == []  # no output, no temp, not even an empty directory


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories anyway")
def test_real_read_only_directory(world, tmp_path, capsys):
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    try:
        message = run_case(compose_args()(world, d), capsys)
        assert "cannot write" in message
        assert list(d.iterdir()) == []
    finally:
        d.chmod(0o755)
