"""Speed work must not change results: workers, token cache, bf16 verdict, precision paths."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import rel_tol, run_precision

from lorasum.data import load_split, make_batches, tokenize_split
from lorasum.data.token_cache import clear_cache, tokenize_cached
from lorasum.evaluate import evaluate_batches, token_nll
from lorasum.models import load_model, load_tokenizer, precision
from lorasum.study.reproduce import reproduce

CPU = torch.device("cpu")


def test_tokenize_cached_equals_tokenize_split(tiny_llama, qa_files):
    tok = load_tokenizer(str(tiny_llama))
    sources = [load_split(str(p), 42) for p in qa_files.values()]
    clear_cache()
    for split in ("train", "test"):
        for srcs in (sources, sources[1:], sources[:1]):
            for _ in range(2):  # second call: from the cache
                assert tokenize_cached(tok, srcs, split, 32) == tokenize_split(tok, srcs, split, 32)
    # other settings are other entries, not a stale hit
    assert tokenize_cached(tok, sources, "test", 12) == tokenize_split(tok, sources, "test", 12)
    assert tokenize_cached(tok, sources, "test", 32, answer_only=False) == tokenize_split(
        tok, sources, "test", 32, answer_only=False
    )


def test_grouped_batches_give_the_same_per_example_loss_as_single_rows(tiny_llama, qa_files):
    """Length-grouped, padded batches: each row's summed NLL equals its own unpadded forward."""
    model, tok = load_model(str(tiny_llama)).eval(), load_tokenizer(str(tiny_llama))
    sources = [load_split(str(p), 42, max_train=12) for p in qa_files.values()]
    items = tokenize_split(tok, sources, "train", 48)
    with torch.no_grad():
        singles = [
            token_nll(model, make_batches([it], 1, tok.pad_token_id, False)[0]) for it in items
        ]
        grouped = {}
        for batch in make_batches(items, 8, tok.pad_token_id, shuffle=True, seed=3):
            nll, n = token_nll(model, batch)
            for row in range(batch.input_ids.shape[0]):
                length = int(batch.attention_mask[row].sum())
                key = tuple(batch.input_ids[row, :length].tolist())
                grouped.setdefault(key, []).append((float(nll[row]), int(n[row])))
    for (nll1, n1), (t, _) in zip(singles, items, strict=True):
        nll_g, n_g = grouped[tuple(t.input_ids)].pop()
        assert n_g == int(n1[0]) == sum(t.counted)
        assert nll_g == pytest.approx(float(nll1[0]), rel=1e-4, abs=1e-4)


@pytest.fixture
def unforced(monkeypatch):
    """``auto`` decided by the (faked) verdict: the run's LORASUM_PRECISION unset."""
    monkeypatch.delenv(precision.PRECISION_ENV, raising=False)


@pytest.mark.precision
def test_bf16_and_fp32_paths_agree(tiny_llama, qa_files):
    model, tok = load_model(str(tiny_llama)), load_tokenizer(str(tiny_llama))
    sources = [load_split(str(p), 42) for p in qa_files.values()]
    batches = make_batches(tokenize_split(tok, sources, "test", 32), 8, tok.pad_token_id, False)
    names = [s.name for s in sources]
    fp32 = evaluate_batches(model, batches, names, CPU, None)
    bf16 = evaluate_batches(model, batches, names, CPU, torch.bfloat16)
    assert bf16["tokens"] == fp32["tokens"]
    assert bf16["perplexity"] == pytest.approx(fp32["perplexity"], rel=2e-2)
    assert bf16["perplexity"] != fp32["perplexity"]  # bf16 really ran


def test_bf16_verdict_is_measured_and_only_a_cache(tmp_path, monkeypatch, unforced):
    monkeypatch.setenv("LORASUM_HOME", str(tmp_path))
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: True)
    monkeypatch.setattr(precision, "load_average", lambda: 0.1)  # a quiet machine
    timings = {None: [2.0, 9.0, 2.0], torch.bfloat16: [1.0, 1.0, 8.0]}  # busy spells in between
    calls = []
    rounds = precision.VERDICT_ROUNDS

    def fake_time(dtype, repeats=3):
        calls.append(dtype)
        series = timings[dtype]
        return series[sum(1 for c in calls if c is dtype) % len(series) - 1]

    monkeypatch.setattr(precision, "time_linear_step", fake_time)
    v1 = precision.cpu_bf16_verdict()
    assert v1["use_bf16"] is True and (v1["fp32_s"], v1["bf16_s"]) == (2.0, 1.0)
    assert calls == [None, torch.bfloat16] * rounds  # interleaved, best of each
    assert v1["provisional"] is False and v1["load_per_core"] == 0.1
    assert precision.autocast_dtype("auto", CPU) is torch.bfloat16
    assert len(calls) == 2 * rounds  # the second call read the cache
    threads = torch.get_num_threads()
    try:  # a study's workers run fewer threads than its driver: one verdict for all of them
        torch.set_num_threads(1 if threads > 1 else 2)
        assert precision.cpu_bf16_verdict()["key"] == v1["key"] and len(calls) == 2 * rounds
    finally:
        torch.set_num_threads(threads)
    (tmp_path / "hardware.json").unlink()  # deleting the cache only costs a re-measurement
    v2 = precision.cpu_bf16_verdict()
    assert v2["use_bf16"] == v1["use_bf16"] and len(calls) == 4 * rounds
    # a stale entry (other CPU/flags/torch) is measured again, and 1.1x does not pay
    data = json.loads((tmp_path / "hardware.json").read_text())
    (tmp_path / "hardware.json").write_text(json.dumps({**data, "key": "other-machine"}))
    timings[torch.bfloat16] = [2.0 / 1.1]
    timings[None] = [2.0]
    assert precision.cpu_bf16_verdict()["use_bf16"] is False and len(calls) == 6 * rounds
    assert precision.autocast_dtype("auto", CPU) is None
    assert precision.autocast_dtype("fp32", CPU) is None
    assert precision.autocast_dtype("bf16", CPU) is torch.bfloat16


def test_bf16_verdict_measured_on_a_busy_machine_is_provisional(tmp_path, monkeypatch, unforced):
    """Measured under load (a running study made fp32 look faster than bf16 on an AMX CPU), the
    verdict stands while the machine stays busy and is measured again once it is quiet."""
    monkeypatch.setenv("LORASUM_HOME", str(tmp_path))
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: True)
    load = {"now": 3.0}
    monkeypatch.setattr(precision, "load_average", lambda: load["now"])
    speed = {None: 0.27, torch.bfloat16: 0.35}  # the busy measurement: bf16 looks slower
    calls = []

    def fake_time(dtype, repeats=3):
        calls.append(dtype)
        return speed[dtype]

    monkeypatch.setattr(precision, "time_linear_step", fake_time)
    busy = precision.cpu_bf16_verdict()
    assert busy["use_bf16"] is False and busy["provisional"] is True
    n = len(calls)
    assert precision.cpu_bf16_verdict()["use_bf16"] is False and len(calls) == n  # still busy
    load["now"] = 0.2
    speed.update({None: 0.027, torch.bfloat16: 0.013})
    quiet = precision.cpu_bf16_verdict()
    assert quiet["use_bf16"] is True and quiet["provisional"] is False and len(calls) == 2 * n
    load["now"] = 3.0
    assert precision.cpu_bf16_verdict()["use_bf16"] is True and len(calls) == 2 * n  # final now


def test_settled_verdict_is_what_a_study_worker_uses(tmp_path, monkeypatch, unforced):
    """A study's driver hands its verdict to the workers: they never measure their own."""
    monkeypatch.setenv("LORASUM_HOME", str(tmp_path))
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: True)

    def must_not_measure(dtype, repeats=3):
        raise AssertionError("a worker with a settled verdict measured again")

    monkeypatch.setattr(precision, "time_linear_step", must_not_measure)
    try:
        precision.settle_cpu_bf16(True)
        assert precision.autocast_dtype("auto", CPU) is torch.bfloat16
        precision.settle_cpu_bf16(False)
        assert precision.autocast_dtype("auto", CPU) is None
        assert precision.autocast_dtype("bf16", CPU) is torch.bfloat16  # asked for: not overridden
    finally:
        precision.settle_cpu_bf16(None)
    assert precision._SETTLED_BF16 is None


def test_bf16_never_chosen_without_bf16_hardware(tmp_path, monkeypatch, unforced):
    """A busy machine can make any micro-benchmark lie; emulated bf16 is never picked."""
    monkeypatch.setenv("LORASUM_HOME", str(tmp_path))
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: False)
    monkeypatch.setattr(
        precision, "time_linear_step", lambda dtype, repeats=3: 1.0 if dtype else 9.0
    )
    verdict = precision.cpu_bf16_verdict()
    assert verdict["use_bf16"] is False and verdict["bf16_s"] is None
    assert precision.autocast_dtype("auto", CPU) is None


def test_bf16_verdict_survives_an_unwritable_cache(tmp_path, monkeypatch, unforced):
    home = tmp_path / "file"
    home.write_text("not a directory")
    monkeypatch.setenv("LORASUM_HOME", str(home))
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: True)
    monkeypatch.setattr(precision, "time_linear_step", lambda dtype, repeats=3: 1.0)
    assert precision.cpu_bf16_verdict()["use_bf16"] is False


def test_time_linear_step_runs_both_precisions():
    assert precision.time_linear_step(None, repeats=1) > 0
    assert precision.time_linear_step(torch.bfloat16, repeats=1) > 0


# measured bitwise equal (0.0) in bf16 on a 2-core AVX512-BF16 EPYC; 1e-3 stays under one bf16
# rounding step (2^-8) for kernels that split the work otherwise
BF16_WORKERS_REL = 1e-3


def _numbers(results: dict) -> list[float]:
    return [
        v
        for row in results["combinations"]
        for v in (row["ppl_sum"], row["ppl_merged"], row["rms_cosine"])
    ] + [s["perplexity"] for s in results["singles"].values()]


@pytest.mark.precision
def test_worker_processes_give_the_same_study(tiny_llama, qa_files, tmp_path):
    """Executor A == executor B: inline (this process, all cores) and two worker processes
    (one thread each, another summation order) give the same study in the run's precision."""
    domains = [f"{n}={p}" for n, p in qa_files.items()]
    kw = dict(preset="tiny", model=str(tiny_llama), domains=domains, progress=False)
    inline = reproduce(tmp_path / "inline", workers=1, **kw)
    pooled = reproduce(tmp_path / "pooled", workers=2, **kw)
    precision = pooled["manifest"]["hardware"]["precision"]
    assert precision == inline["manifest"]["hardware"]["precision"] == run_precision()
    for marker in (tmp_path / "pooled").glob("seed-*/adapters/*/lorasum.json"):
        assert json.loads(marker.read_text())["metrics"]["precision"] == precision  # each worker
    # bf16: a summation order that differs in fp32's last bits could round a bf16 activation
    # the other way, and training would carry that on
    tol = rel_tol(precision, fp32=1e-4, bf16=BF16_WORKERS_REL)
    assert _numbers(pooled) == pytest.approx(_numbers(inline), rel=tol)
    # every unit exists once, complete, in the pooled study
    for unit in ("arith", "merged-arith+colors+finance"):
        marker = json.loads(
            (tmp_path / "pooled" / "seed-42" / "adapters" / unit / "lorasum.json").read_text()
        )
        assert marker["kind"] == "adapter"
    # singles, merged + sum per combination, the triple's three paper variants
    assert len(list((tmp_path / "pooled" / "seed-42" / "evals").glob("*.json"))) == 3 + 2 * 4 + 3


def test_workers_must_be_positive(tiny_llama, qa_files, tmp_path):
    from lorasum.errors import LorasumError

    with pytest.raises(LorasumError, match="--workers"):
        reproduce(
            tmp_path / "s",
            preset="tiny",
            model=str(tiny_llama),
            domains=[f"{n}={p}" for n, p in qa_files.items()],
            workers=0,
            progress=False,
        )
    assert not (tmp_path / "s").exists()


def test_workers_exit_when_the_study_process_is_killed(tiny_llama, qa_files, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    psutil = pytest.importorskip("psutil")
    domains = [f"{n}={p}" for n, p in qa_files.items()]
    script = (
        "from lorasum.study.reproduce import reproduce\n"
        f"reproduce({str(tmp_path / 's')!r}, preset='tiny', model={str(tiny_llama)!r}, "
        f"domains={domains!r}, workers=2, progress=False, seeds=[1, 2, 3])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "LORASUM_WORKERS"}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env)
    workers: list = []
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        kids = psutil.Process(proc.pid).children(recursive=True)
        workers = [k for k in kids if "spawn_main" in " ".join(k.cmdline())]
        if len(workers) >= 2:
            break
        time.sleep(0.1)
    assert proc.poll() is None and len(workers) == 2, "the study ended before its workers started"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _, alive = psutil.wait_procs(workers, timeout=20)
    assert not alive, f"workers kept running after their study was killed: {alive}"


def test_max_order_and_all_domains(tiny_llama, qa_files, tmp_path):
    from lorasum.data import ALL_DOMAINS
    from lorasum.errors import LorasumError
    from lorasum.study.reproduce import combinations, parse_domains

    assert list(parse_domains("all")) == list(ALL_DOMAINS)
    assert list(parse_domains(["all"])) == list(ALL_DOMAINS)
    names = list("abcd")
    assert len(combinations(names)) == 11 and len(combinations(names, 2)) == 6
    assert combinations(names, 3) == [c for c in combinations(names) if len(c) <= 3]
    domains = [f"{n}={p}" for n, p in qa_files.items()]
    out = tmp_path / "pairs"
    res = reproduce(
        out, preset="tiny", model=str(tiny_llama), domains=domains, max_order=2, progress=False
    )
    assert [len(r["domains"]) for r in res["combinations"]] == [2, 2, 2]
    assert res["max_order"] == 2
    adapters = sorted(p.name for p in (out / "seed-42" / "adapters").iterdir())
    assert "merged-arith+colors+finance" not in adapters and len(adapters) == 3 + 3
    with pytest.raises(LorasumError, match="--max-order"):
        reproduce(
            tmp_path / "x",
            preset="tiny",
            model=str(tiny_llama),
            domains=domains,
            max_order=1,
            progress=False,
        )
    assert not (tmp_path / "x").exists()


def test_study_workers_start_with_the_drivers_verdict(tiny_llama, unforced):
    from lorasum.study.executors import init_worker

    threads = torch.get_num_threads()
    try:
        init_worker(str(tiny_llama), "cpu", 1, False, None, True)
        assert precision.autocast_dtype("auto", CPU) is torch.bfloat16
        init_worker(str(tiny_llama), "cpu", 1, False, None, False)
        assert precision.autocast_dtype("auto", CPU) is None
    finally:
        precision.settle_cpu_bf16(None)
        torch.set_num_threads(threads)


def test_frozen_linears_cast_once_and_restored_bit_for_bit(tiny_llama):
    from peft import LoraConfig, get_peft_model

    model = load_model(str(tiny_llama), CPU)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    peft = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "down_proj"]))
    ptrs = {n: p.data_ptr() for n, p in peft.named_parameters()}
    with precision.frozen_linears_as(peft, torch.bfloat16) as n_cast:
        dtypes = {n: p.dtype for n, p in peft.named_parameters()}
        assert n_cast > 0
    for n, dt in dtypes.items():
        frozen_linear = n.endswith("proj.weight") or n.endswith("base_layer.weight")
        if "lora_" in n or "embed" in n or "norm" in n:
            assert dt == torch.float32, n  # trainable, embeddings and norms untouched
        elif frozen_linear:
            assert dt == torch.bfloat16, n
    # the tied head is the embedding: its tensor left alone, the head reads a bf16 copy
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert "forward" not in vars(model.lm_head)  # the head's own forward back
    x = torch.randn(3, model.lm_head.in_features)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model.lm_head(x)
        with precision.frozen_linears_as(peft, torch.bfloat16):
            assert "forward" in vars(model.lm_head)
            assert torch.equal(model.lm_head(x), expected)  # autocast's numbers
            with precision.frozen_linears_as(peft, torch.bfloat16):  # nested (eval in training)
                assert torch.equal(model.lm_head(x), expected)
            assert "forward" in vars(model.lm_head)  # the outer block's copy still in use
    for n, p in peft.named_parameters():
        assert p.dtype == torch.float32 and p.data_ptr() == ptrs[n], n  # the same tensors back
    restored = peft.unload()
    for n, p in restored.named_parameters():
        assert torch.equal(p, before[n]), n
    with precision.frozen_linears_as(restored, None) as n_cast:
        assert n_cast == 0


def _null_cast(model, dtype):
    import contextlib

    return contextlib.nullcontext(0)


@pytest.mark.precision
def test_bf16_training_and_eval_equal_with_and_without_the_cast_once(
    tiny_llama, qa_files, tmp_path, monkeypatch
):
    """Casting the frozen weights once gives autocast's own numbers (autocast rounds every
    fp32 weight the same way on every matmul): bitwise the same adapter and perplexity."""
    from safetensors.torch import load_file

    import lorasum.evaluate as evaluate_mod
    import lorasum.training.loop as train_mod
    from lorasum.training import TrainConfig, train

    cfg = TrainConfig(
        model=str(tiny_llama),
        data=[str(qa_files["arith"])],
        max_steps=6,
        lr=3e-3,
        batch_size=8,
        max_length=32,
        dropout=0.1,
        precision="bf16",
        eval_val=True,
    )
    cast = train(cfg, tmp_path / "cast", progress=False)
    monkeypatch.setattr(train_mod, "frozen_linears_as", _null_cast)
    monkeypatch.setattr(evaluate_mod, "frozen_linears_as", _null_cast)
    plain = train(cfg, tmp_path / "plain", progress=False)
    a = load_file(tmp_path / "cast" / "adapter_model.safetensors")
    b = load_file(tmp_path / "plain" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert cast["metrics"]["val_perplexity"] == plain["metrics"]["val_perplexity"]
    assert cast["metrics"]["final_loss"] == plain["metrics"]["final_loss"]

    # evaluation of the trained adapter: the same perplexity with and without the cast
    tok = load_tokenizer(str(tiny_llama))
    from peft import PeftModel

    from lorasum.data import load_split

    src = [load_split(str(qa_files["arith"]), 42)]
    batches = make_batches(tokenize_split(tok, src, "test", 32), 8, tok.pad_token_id, False)
    model = PeftModel.from_pretrained(load_model(str(tiny_llama), CPU), tmp_path / "cast")
    monkeypatch.setattr(evaluate_mod, "norm_outputs_as", _null_cast)
    without = evaluate_batches(model, batches, ["arith"], CPU, torch.bfloat16)
    monkeypatch.undo()
    with_cast = evaluate_batches(model, batches, ["arith"], CPU, torch.bfloat16)
    assert with_cast["perplexity"] == without["perplexity"]
    assert with_cast["per_dataset"] == without["per_dataset"]
    with precision.norm_outputs_as(model.get_base_model(), torch.bfloat16) as hooked:
        assert hooked == 2 * model.config.num_hidden_layers  # both norms of every layer
    fp32 = evaluate_batches(model, batches, ["arith"], CPU, None)
    assert fp32["perplexity"] != with_cast["perplexity"]  # bf16 really ran
