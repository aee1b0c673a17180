"""Training budgets: snapshots along a run equal trainings stopped there, the patience rule stops
where a hand computation says and keeps the best weights, and the budget is recorded."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, replace

import pytest
import torch
from safetensors.torch import load_file

import lorasum.training.loop as train_mod
from lorasum.adapters import read_adapter
from lorasum.data import QA, Source
from lorasum.data.token_cache import tokenize_cached
from lorasum.errors import LorasumError
from lorasum.evaluate import evaluate
from lorasum.io import read_json
from lorasum.models import load_model
from lorasum.training import (
    TrainConfig,
    adapter_key,
    load_sources,
    patience_stop,
    schedule,
    snapshot_key,
    train,
)

BUDGET_FIELDS = {"snapshots", "stop_at", "eval_every", "patience", "max_epochs", "schedule"}
# like the budget fields, --lora-a's join the identity only when not the standard LoRA;
# --choices-field never does (it only says where options are)
NEWER_FIELDS = BUDGET_FIELDS | {"lora_a", "a_slot", "a_seed", "choices_field"}


def _cfg(model, data, **kw) -> TrainConfig:
    """48 training rows, batch 8: 6 optimizer steps per epoch. Dropout on, so the RNG matters."""
    base = dict(
        model=str(model),
        data=[str(d) for d in data],
        max_steps=10,
        lr=3e-3,
        batch_size=8,
        max_length=32,
        dropout=0.1,
        eval_val=False,
        warmup_steps=2,
        precision="fp32",
        device="cpu",
    )
    return TrainConfig(**{**base, **kw})


def _weights(path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "adapter_model.safetensors"))


def _assert_same_weights(a, b) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in wa.items())  # trained, B != 0
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-6, atol=1e-8)


def _log(path) -> list[dict]:
    return [json.loads(x) for x in (path / "train_log.jsonl").read_text().splitlines()]


# (val losses, patience, best index, stop index): answers computed by hand from the rule
# "stop at the patience-th evaluation in a row that is not lower than the best so far".
PATIENCE_CASES = [
    ([5.0, 4.0, 3.0, 2.0], 2, 3, None),  # always improving: never stops
    ([5.0, 4.0, 4.5, 3.9, 4.0, 4.1], 2, 3, 5),  # 4.0, 4.1 after the best 3.9
    ([3.0, 3.0, 3.0], 2, 0, 2),  # a tie is no improvement; the earlier best is kept
    ([4.0, 5.0, 3.0, 6.0, 7.0, 2.0], 2, 2, 4),  # stops before the later 2.0 is seen
    ([2.0, 3.0], 1, 0, 1),
    ([float("nan"), 5.0, 6.0], 1, 1, 2),  # NaN is never the best
    ([1.0, 2.0, 3.0, 0.5], 3, 3, None),  # 0.5 improves: not a 3rd evaluation without one
    ([1.0, 2.0, 3.0, 1.0], 3, 0, 3),  # 1.0 ties the best: the 3rd without improvement
]


@pytest.mark.parametrize("losses,patience,best,stop", PATIENCE_CASES)
def test_patience_stop_on_scripted_curves(losses, patience, best, stop):
    assert patience_stop(losses, patience) == (best, stop)
    # the stop index is the first prefix at which the rule fires, and later values don't matter
    if stop is not None:
        assert patience_stop(losses[: stop + 1] + [-1.0, -2.0], patience) == (best, stop)


def test_snapshots_equal_trainings_stopped_there(tiny_llama, qa_files, tmp_path):
    from peft import PeftModel

    cfg = _cfg(tiny_llama, [qa_files["arith"]], snapshots="7,3")
    assert cfg.snapshots == [3, 7]
    out = tmp_path / "with"
    marker = train(cfg, out, progress=False)
    plain = train(replace(cfg, snapshots=[]), tmp_path / "without", progress=False)

    # the snapshots did not perturb training: the same final adapter, step for step
    _assert_same_weights(out, tmp_path / "without")
    assert [r["loss"] for r in _log(out)] == [r["loss"] for r in _log(tmp_path / "without")]
    assert marker["key"] != plain["key"]
    assert marker["metrics"]["steps"] == 10 and not marker["metrics"]["stopped_early"]

    sources = load_sources(cfg)
    for step in (3, 7):
        stopped_cfg = replace(cfg, snapshots=[], stop_at=step)
        stopped = train(stopped_cfg, tmp_path / f"stop{step}", progress=False)
        snap = out / "snapshots" / f"step-{step}"
        _assert_same_weights(snap, tmp_path / f"stop{step}")
        m = stopped["metrics"]
        assert m["steps"] == step and m["schedule_steps"] == 10
        # same schedule: the stopped run's rates are the full run's first ones
        assert [r["lr"] for r in _log(tmp_path / f"stop{step}")] == [
            r["lr"] for r in _log(out)[:step]
        ]
        info = read_json(snap / "lorasum.json")
        assert info["kind"] == "snapshot" and info["parent"] == marker["key"]
        assert info["step"] == step and info["epoch"] == pytest.approx(step * 8 / 48)
        assert (
            info["real_tokens"]
            == m["real_tokens"]
            == sum(r["real_tokens"] for r in _log(out)[:step])
        )
        assert info["answer_tokens"] == m["answer_tokens"]
        # its own key: independent of which other snapshots the run took
        assert info["key"] == snapshot_key(replace(cfg, snapshots=[step]), sources, step)
        assert info["key"] not in (marker["key"], stopped["key"])
        assert read_adapter(snap).modules.keys() == read_adapter(out).modules.keys()

    # the final adapter reads as before: snapshots/ is not part of it
    assert {p.name for p in out.iterdir()} - {"README.md"} == {  # PEFT may write a model card
        "adapter_config.json",
        "adapter_model.safetensors",
        "train_log.jsonl",
        "lorasum.json",
        "snapshots",
    }
    assert read_adapter(out).modules.keys() == read_adapter(tmp_path / "without").modules.keys()
    assert not list((out / "snapshots").glob(".*"))  # no temp dirs left
    peft_model = PeftModel.from_pretrained(
        load_model(str(tiny_llama), torch.device("cpu")), str(out / "snapshots" / "step-3")
    )
    assert len([n for n, _ in peft_model.named_modules() if n.endswith("lora_A")]) == 10

    # a rerun reuses the finished adapter and its snapshots
    mtime = (out / "snapshots" / "step-3" / "adapter_model.safetensors").stat().st_mtime_ns
    assert train(cfg, out, progress=False) == read_json(out / "lorasum.json")
    assert (out / "snapshots" / "step-3" / "adapter_model.safetensors").stat().st_mtime_ns == mtime


def test_steps_beyond_the_run_are_one_line_errors(tiny_llama, qa_files, tmp_path):
    for kw, flag in (({"snapshots": [2, 11]}, "--snapshots"), ({"stop_at": 11}, "--stop-at")):
        with pytest.raises(LorasumError, match=f"{flag}.*beyond the run's 10 steps") as e:
            train(_cfg(tiny_llama, [qa_files["arith"]], **kw), tmp_path / "x", progress=False)
        assert "\n" not in str(e.value)
    assert not (tmp_path / "x").exists()
    # epochs decide the length when --max-steps is 0: 1.5 epochs of 6 steps = 9 steps
    with pytest.raises(LorasumError, match="beyond the run's 9 steps"):
        cfg = _cfg(tiny_llama, [qa_files["arith"]], max_steps=0, epochs=1.5, snapshots=[10])
        train(cfg, tmp_path / "y", progress=False)


def test_budget_config_validation():
    with pytest.raises(LorasumError) as e:
        TrainConfig(data=["math"], snapshots="2,x,0", patience=0, stop_at=-1)
    msg = str(e.value)
    for part in ("'x'", "--snapshots 0", "--patience", "--stop-at"):
        assert part in msg, part
    with pytest.raises(LorasumError, match="--max-epochs caps a --eval-every run"):
        TrainConfig(data=["math"], max_epochs=2)
    with pytest.raises(LorasumError, match="not both"):
        TrainConfig(data=["math"], eval_every=2, max_epochs=2, max_steps=5)
    assert TrainConfig(data=["math"], snapshots=["4", "2", "4"]).snapshots == [2, 4]


def test_keys_without_budget_fields_are_unchanged():
    """The identity of a config that uses no budget field is the one from before they existed
    (all other fields), so finished studies keep their adapter keys."""
    cfg = TrainConfig(data=["math"])
    before = {k: v for k, v in asdict(cfg).items() if k not in NEWER_FIELDS}
    before.pop("device")
    before.pop("eval_val")
    assert cfg.identity() == before
    assert TrainConfig(data=["math"], snapshots=[2]).identity()["snapshots"] == [2]
    assert TrainConfig(data=["math"], stop_at=3).identity()["stop_at"] == 3
    # the linear schedule is the default and not in the identity; constant is, and changes keys
    assert TrainConfig(data=["math"], schedule="linear").identity() == cfg.identity()
    assert TrainConfig(data=["math"], schedule="constant").identity()["schedule"] == "constant"
    converged = TrainConfig(data=["math"], eval_every=2, max_epochs=3).identity()
    assert [converged[k] for k in ("eval_every", "patience", "max_epochs")] == [2, 3, 3.0]
    # the val split decides a converged adapter's weights, so it is in its key
    row = QA("What is 1 plus 1?", "2")
    src = Source("s", "o", {"train": [row], "val": [], "test": []})
    other = Source("s", "o", {"train": [row], "val": [row], "test": []})
    conv = TrainConfig(data=["math"], eval_every=2, eval_val=False)
    assert adapter_key(conv, [src]) != adapter_key(conv, [other])
    plain = TrainConfig(data=["math"], eval_val=False)
    assert adapter_key(plain, [src]) == adapter_key(plain, [other])


def test_converged_stops_by_the_patience_rule_and_keeps_the_best(
    tiny_llama, qa_files, tmp_path, monkeypatch
):
    monkeypatch.setattr(schedule, "MIN_VAL_ROWS", 1)  # the curve is scripted; 6 val rows do
    script = [5.0, 4.0, 4.5, 3.9, 4.0, 4.1, 1.0, 1.0, 1.0]  # evaluated at steps 2, 4, 6, ...
    calls = []

    def scripted(model, batches, names, device, amp):
        assert len(batches) > 0  # the val split's batches
        calls.append(model.training)
        return script[len(calls) - 1]

    monkeypatch.setattr(train_mod, "validation_loss", scripted)
    cfg = _cfg(
        tiny_llama,
        [qa_files["arith"]],
        max_steps=0,
        eval_every=2,
        patience=2,
        max_epochs=3,
        snapshots=[8, 12],
    )
    out = tmp_path / "converged"
    marker = train(cfg, out, progress=False)
    # by hand: best 3.9 at the 4th evaluation (step 8); 4.0, 4.1 follow: stop at step 12
    m = marker["metrics"]
    assert (m["steps"], m["best_step"], m["schedule_steps"]) == (12, 8, 18)
    assert m["stopped_early"] is True and m["epochs"] == pytest.approx(12 * 8 / 48)
    assert (m["stop_step"], m["stopped_by"], m["schedule"]) == (12, "patience", "linear")
    assert [p["step"] for p in m["val_curve"]] == [2, 4, 6, 8, 10, 12]
    assert [p["val_loss"] for p in m["val_curve"]] == script[:6]
    assert m["val_curve"][3]["val_perplexity"] == pytest.approx(math.exp(3.9))
    assert m["val_perplexity"] == pytest.approx(math.exp(3.9))
    assert len(calls) == 6
    log = _log(out)
    assert [r["step"] for r in log if "val_loss" in r] == [2, 4, 6, 8, 10, 12]
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 13))

    # the saved adapter is the weights at step 8: the run's own snapshot there, and a plain
    # training of the same schedule (3 epochs) stopped at step 8 without any validation
    _assert_same_weights(out, out / "snapshots" / "step-8")
    stopped = replace(cfg, eval_every=0, max_epochs=0, epochs=3, snapshots=[], stop_at=8)
    train(stopped, tmp_path / "stop8", progress=False)
    _assert_same_weights(out, tmp_path / "stop8")
    w12, w8 = _weights(out / "snapshots" / "step-12"), _weights(out)
    assert any(not torch.equal(w12[k], w8[k]) for k in w8)  # the best, not the last, was kept


def test_converged_with_real_validation_keeps_the_best_val_weights(
    tiny_llama, qa_files, tmp_path, monkeypatch
):
    monkeypatch.setattr(schedule, "MIN_VAL_ROWS", 1)  # 6 val rows: enough for this check
    cfg = _cfg(
        tiny_llama, [qa_files["colors"]], max_steps=0, eval_every=2, patience=1, max_epochs=1
    )
    out = tmp_path / "real"
    m = train(cfg, out, progress=False)["metrics"]
    curve = m["val_curve"]
    assert [p["step"] for p in curve][:2] == [2, 4]
    best = min(curve, key=lambda p: p["val_loss"])
    assert m["best_step"] == best["step"]
    # the kept weights' val perplexity, measured independently, is the best point's
    val = evaluate(
        model=str(tiny_llama),
        data=[str(qa_files["colors"])],
        adapter=str(out),
        split="val",
        max_length=32,
        batch_size=3,
        precision="fp32",
        device="cpu",
        progress=False,
    )
    assert val["perplexity"] == pytest.approx(best["val_perplexity"], rel=1e-4)


def test_converged_without_val_rows_is_an_error(tiny_llama, qa_files, tmp_path):
    cfg = _cfg(tiny_llama, [qa_files["arith"]], max_steps=0, eval_every=2, max_epochs=1)
    sources = [dataclasses.replace(s, splits={**s.splits, "val": []}) for s in load_sources(cfg)]
    with pytest.raises(LorasumError, match="at least 16 validation rows; .* has 0 ") as e:
        train(cfg, tmp_path / "noval", sources=sources, progress=False)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "noval").exists()


def _source(val_rows: int) -> Source:
    row = QA("What is 1 plus 1?", "2")
    return Source("s", "o", {"train": [row], "val": [row] * val_rows, "test": [row]})


# (validation rows per source, eval_every, max_eval, refused): at least MIN_VAL_ROWS = 16 rows
# in the union of the sources' validation splits, and only when --eval-every decides the stop
VAL_ROWS_CASES = [
    ([15], 2, None, True),
    ([16], 2, None, False),
    ([8, 8], 2, None, False),  # a merged adapter validates on the union
    ([4], 2, 4, True),
    ([0], 0, None, False),  # no patience stopping: nothing to decide
]


@pytest.mark.parametrize("rows,eval_every,max_eval,refused", VAL_ROWS_CASES)
def test_val_rows_problem(rows, eval_every, max_eval, refused):
    cfg = TrainConfig(data=["math"], eval_every=eval_every, max_eval=max_eval)
    problem = schedule.val_rows_problem(cfg, [_source(n) for n in rows])
    assert (problem is not None) == refused
    if refused:
        assert f"has {sum(rows)} " in problem and "\n" not in problem
        assert ("--max-eval 4" in problem) == (max_eval == 4)


def test_too_few_validation_rows_exit_2_via_the_cli_and_write_nothing(
    tiny_llama, qa_files, tmp_path, capsys, monkeypatch
):
    from lorasum.cli import main

    monkeypatch.setenv("LORASUM_PRECISION", "fp32")
    out = tmp_path / "small"
    argv = [
        "train",
        "--model",
        str(tiny_llama),
        "--data",
        str(qa_files["arith"]),
        "--out",
        str(out),
        "--eval-every",
        "2",
        "--max-epochs",
        "1",
        "--device",
        "cpu",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lorasum: error: ")
    # 60 rows: a validation split of 6
    assert "at least 16 validation rows" in err and "has 6 (" in err
    for fix in ("more data", "--max-eval", "--budget converged"):
        assert fix in err, fix
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_constant_schedule_ends_by_the_cap_or_by_patience_on_scripted_curves(
    tiny_llama, qa_files, tmp_path, monkeypatch
):
    """Constant learning rate after warmup; a curve that keeps improving runs to the cap
    (--max-epochs), one that rises stops by patience and keeps its minimum's weights."""
    monkeypatch.setenv("LORASUM_PRECISION", "fp32")
    monkeypatch.setattr(schedule, "MIN_VAL_ROWS", 1)  # the curve is scripted, not measured
    script: list[float] = []
    monkeypatch.setattr(train_mod, "validation_loss", lambda *a: script.pop(0))
    data = [qa_files["arith"]]
    # 6 steps per epoch, cap 2 epochs = 12 steps, evaluations at steps 2, 4, ..., 12
    kw = dict(max_steps=0, eval_every=2, patience=2, max_epochs=2, schedule="constant")

    script[:] = [5.0, 4.0, 3.0, 2.0, 1.5, 1.0]  # keeps improving
    cap = train(_cfg(tiny_llama, data, **kw), tmp_path / "cap", progress=False)["metrics"]
    assert (cap["stopped_by"], cap["stopped_early"], cap["schedule"]) == ("cap", False, "constant")
    assert (cap["stop_step"], cap["steps"], cap["best_step"], cap["schedule_steps"]) == (
        12,
        12,
        12,
        12,
    )
    assert script == []
    # the rate is 0, then half the peak during 2 warmup steps, then the peak at every step
    lrs = [r["lr"] for r in _log(tmp_path / "cap") if "loss" in r]
    assert lrs[:2] == pytest.approx([0.0, 1.5e-3]) and lrs[2:] == [3e-3] * 10
    # the default linear schedule of the same run decays to 0 over the cap instead
    linear = replace(_cfg(tiny_llama, data, **kw), schedule="linear")
    script[:] = [5.0, 4.0, 3.0, 2.0, 1.5, 1.0]
    train(linear, tmp_path / "linear", progress=False)
    lin = [r["lr"] for r in _log(tmp_path / "linear") if "loss" in r]
    assert all(a > b for a, b in zip(lin[2:], lin[3:], strict=False)) and lin[-1] < 3e-3 / 5

    script[:] = [5.0, 4.0, 3.0, 3.5, 4.0, 9.9]  # lowest at step 6, then rises
    out = tmp_path / "patience"
    cfg = _cfg(tiny_llama, data, **kw, snapshots=[6, 10])
    m = train(cfg, out, progress=False)["metrics"]
    # by hand: best 3.0 at step 6; 3.5 and 4.0 follow, the 2nd without improvement: step 10
    assert (m["stopped_by"], m["stopped_early"]) == ("patience", True)
    assert (m["stop_step"], m["steps"], m["best_step"], m["schedule_steps"]) == (10, 10, 6, 12)
    assert [p["step"] for p in m["val_curve"]] == [2, 4, 6, 8, 10] and script == [9.9]
    _assert_same_weights(out, out / "snapshots" / "step-6")
    # under a constant rate the first 6 steps do not depend on the run's length: the kept
    # weights are a plain 6-step training's
    train(
        _cfg(tiny_llama, data, max_steps=6, schedule="constant"), tmp_path / "six", progress=False
    )
    _assert_same_weights(out, tmp_path / "six")
    w10 = _weights(out / "snapshots" / "step-10")
    assert any(not torch.equal(w10[k], v) for k, v in _weights(out).items())


def test_max_steps_beyond_an_epoch_cycles_through_every_row(
    tiny_llama, qa_files, tmp_path, monkeypatch
):
    calls = []
    real = train_mod.make_batches

    def spy(items, *a, **kw):
        calls.append(len(items))
        return real(items, *a, **kw)

    monkeypatch.setattr(train_mod, "make_batches", spy)
    cfg = _cfg(tiny_llama, [qa_files["finance"]], max_steps=12)  # 2 x 6 steps per epoch
    m = train(cfg, tmp_path / "twice", progress=False)["metrics"]
    assert m["steps"] == 12 and m["epochs"] == pytest.approx(2.0)
    assert calls == [48, 48]  # two full passes were made, and both were used up
    assert [r["epoch"] for r in _log(tmp_path / "twice")] == [0] * 6 + [1] * 6
    # every row twice: the tokens processed are twice the rows' tokens
    from lorasum.models import load_tokenizer

    items = tokenize_cached(load_tokenizer(str(tiny_llama)), load_sources(cfg), "train", 32)
    assert m["real_tokens"] == 2 * sum(len(t.input_ids) for t, _ in items)
    assert m["answer_tokens"] == 2 * sum(sum(t.counted) for t, _ in items)


def test_cli_flags_from_the_budget_fields(tiny_llama):
    from lorasum.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(
        ["train", "--out", "x", "--data", "math", "--snapshots", "2,4", "--eval-every", "3"]
    )
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    assert cfg.snapshots == [2, 4] and cfg.eval_every == 3 and cfg.patience == 3
    train_parser = parser._subparsers._group_actions[0].choices["train"]
    text = " ".join(train_parser.format_help().split())
    for part in (
        "--snapshots",
        "--stop-at",
        "--eval-every",
        "--patience",
        "--max-epochs",
        "--schedule",
    ):
        assert part in text, part
    assert "mid-schedule" in text and "(comma list)" in text
