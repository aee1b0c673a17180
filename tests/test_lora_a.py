"""Adapters trained to be added: `--lora-a frozen` (A at its seeded init, B trained) and
`--lora-a disjoint` (A frozen at a slot of one seeded orthonormal basis, so that adapters in
different slots have A_i A_jᵀ = 0 exactly)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import load_tiny, qa_domains
from safetensors.torch import load_file

from lorasum.cli import main
from lorasum.compose import compose
from lorasum.models import resolve_target_modules
from lorasum.study.reproduce import reproduce
from lorasum.training import TrainConfig, train
from lorasum.training.loop import _attach_lora
from lorasum.training.lora_a import disjoint_block, orthonormal_rows, shared_slots


@pytest.fixture(autouse=True)
def _fp32(monkeypatch):
    monkeypatch.setenv("LORASUM_PRECISION", "fp32")


def _cfg(model, data, **kw) -> TrainConfig:
    settings = dict(max_steps=3, lr=1e-2, batch_size=4, max_length=32, eval_val=False)
    return TrainConfig(model=str(model), data=[str(data)], **{**settings, **kw})


def _a_b(path) -> tuple[dict, dict]:
    w = load_file(path / "adapter_model.safetensors")
    a = {k.replace(".lora_A.weight", ""): v for k, v in w.items() if "lora_A" in k}
    b = {k.replace(".lora_B.weight", ""): v for k, v in w.items() if "lora_B" in k}
    return a, b


def test_orthonormal_rows_are_orthonormal_seeded_and_prefix_stable():
    q = orthonormal_rows(64, 24, 7)
    assert q.shape == (24, 64)
    assert torch.allclose(q @ q.t(), torch.eye(24), atol=1e-6)
    assert torch.equal(orthonormal_rows(64, 8, 7), q[:8])  # slot 0's rows whatever is asked
    assert not torch.allclose(orthonormal_rows(64, 8, 8), q[:8])  # another seed, another basis
    a0, a2 = disjoint_block(64, 4, 0, 7), disjoint_block(64, 4, 2, 7)
    assert torch.equal(a0, q[:4]) and torch.equal(a2, q[8:12])
    assert torch.allclose(a0 @ a2.t(), torch.zeros(4, 4), atol=1e-6)


def test_disjoint_adapters_have_orthogonal_frozen_a_and_trained_b(tiny_llama, qa_files, tmp_path):
    """Two domains in slots 0 and 1: A_0 A_1ᵀ = 0 for every module, A is the slot's block
    (unchanged by training), B trained; the same (seed, slot) on other data gives the same A."""
    runs = {
        "s0": _cfg(tiny_llama, qa_files["arith"], lora_a="disjoint", a_slot=0, a_seed=3),
        "s1": _cfg(tiny_llama, qa_files["colors"], lora_a="disjoint", a_slot=1, a_seed=3),
        "s0-other-data": _cfg(tiny_llama, qa_files["finance"], lora_a="disjoint", a_seed=3),
    }
    for name, cfg in runs.items():
        marker = train(cfg, tmp_path / name, progress=False)
        assert (marker["config"]["lora_a"], marker["config"]["a_slot"]) == (
            "disjoint",
            cfg.a_slot,
        )
    (a0, b0), (a1, b1), (a0x, _) = (_a_b(tmp_path / n) for n in runs)
    assert a0.keys() == a1.keys() == b0.keys() and len(a0) > 0
    for m in a0:
        r, width = a0[m].shape
        assert torch.allclose(a0[m] @ a1[m].t(), torch.zeros(r, r), atol=1e-6), m
        assert torch.equal(a0[m], disjoint_block(width, r, 0, 3)), m
        assert torch.equal(a1[m], disjoint_block(width, r, 1, 3)), m
        assert torch.equal(a0[m], a0x[m]), m
        assert b0[m].abs().max() > 0 and b1[m].abs().max() > 0, m  # B left its zero init


def test_frozen_a_stays_at_its_seeded_init_and_b_trains(tiny_llama, qa_files, tmp_path):
    cfg = _cfg(tiny_llama, qa_files["arith"], lora_a="frozen", seed=5)
    train(cfg, tmp_path / "frozen", progress=False)
    model = load_tiny(tiny_llama)
    init = _attach_lora(
        model,
        TrainConfig(**{**cfg.__dict__, "lora_a": "trained"}),
        resolve_target_modules(model, "auto"),
    )
    init_a = {
        k.replace("base_model.model.", "").replace(".lora_A.default.weight", ""): v.detach()
        for k, v in init.named_parameters()
        if "lora_A" in k
    }
    a, b = _a_b(tmp_path / "frozen")
    assert {k.replace("base_model.model.", "") for k in a} == set(init_a)
    for k, v in a.items():
        assert torch.equal(v, init_a[k.replace("base_model.model.", "")]), k
    assert all(v.abs().max() > 0 for v in b.values())
    # a standard adapter of the same seed moves its A: the freeze is what kept it
    train(_cfg(tiny_llama, qa_files["arith"], seed=5), tmp_path / "trained", progress=False)
    a_trained, _ = _a_b(tmp_path / "trained")
    assert any(not torch.equal(a_trained[k], a[k]) for k in a)


def test_standard_adapters_keep_their_keys():
    base = TrainConfig(data=["math"])
    assert "lora_a" not in base.identity() and "a_slot" not in base.identity()
    assert TrainConfig(data=["math"], lora_a="frozen").identity()["lora_a"] == "frozen"
    assert "a_slot" not in TrainConfig(data=["math"], lora_a="frozen").identity()
    disjoint = TrainConfig(data=["math"], lora_a="disjoint", a_slot=2).identity()
    assert (disjoint["a_slot"], disjoint["a_seed"]) == (2, 0)


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--lora-a", "sometimes"], "--lora-a 'sometimes': use one of trained, frozen, disjoint"),
        (["--lora-a", "disjoint", "--a-slot", "-1"], "--a-slot must be >= 0"),
        (["--a-slot", "2"], "--a-slot and --a-seed apply to --lora-a disjoint"),
        (["--lora-a", "frozen", "--a-seed", "1"], "--a-slot and --a-seed apply to --lora-a"),
        (["--lora-a", "disjoint", "--a-slot", "16"], "slot 16 at rank 4 needs 68 input dim"),
    ],
)
def test_bad_lora_a_flags_are_one_line(flags, message, tiny_llama, qa_files, tmp_path, capsys):
    out = tmp_path / "deep" / "out"
    argv = [
        "train",
        "--model",
        str(tiny_llama),
        "--data",
        str(qa_files["arith"]),
        "--out",
        str(out),
        "--max-steps",
        "1",
        "--max-length",
        "32",
        "--rank",
        "4",
        *flags,
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "deep").exists()


def test_compose_warns_when_two_adapters_share_a_slot(tiny_llama, qa_files, tmp_path, caplog):
    for name, data, slot in (("a", "arith", 0), ("b", "colors", 0), ("c", "finance", 1)):
        cfg = _cfg(tiny_llama, qa_files[data], lora_a="disjoint", a_slot=slot, max_steps=1)
        train(cfg, tmp_path / name, progress=False)
    caplog.set_level(logging.WARNING)
    compose([tmp_path / "a", tmp_path / "c"], tmp_path / "ac")
    assert not [r for r in caplog.records if "same slot" in r.getMessage()]
    compose([tmp_path / "a", tmp_path / "b"], tmp_path / "ab")
    [warning] = [r.getMessage() for r in caplog.records if "same slot" in r.getMessage()]
    assert "same slot 0" in warning and "--a-slot" in warning
    assert shared_slots({"x": None, "y": {"config": {"lora_a": "trained"}}}) is None


def test_a_study_gives_each_domain_its_slot_and_keeps_merged_training_standard(
    tiny_llama, qa_files, tmp_path
):
    out = tmp_path / "study"
    reproduce(
        out,
        preset="tiny",
        model=str(tiny_llama),
        domains=qa_domains(qa_files, 2),
        max_order=2,
        lora_a="disjoint",
        a_seed=4,
        progress=False,
    )
    names = list(qa_files)[:2]
    adapters = out / "seed-42" / "adapters"
    for i, n in enumerate(names):
        cfg = json.loads((adapters / n / "lorasum.json").read_text())["config"]
        assert (cfg["lora_a"], cfg["a_slot"], cfg["a_seed"]) == ("disjoint", i, 4)
    merged = json.loads((adapters / f"merged-{'+'.join(names)}" / "lorasum.json").read_text())
    assert merged["config"]["lora_a"] == "trained"
    (a0, _), (a1, _) = (_a_b(adapters / n) for n in names)
    for m in a0:
        assert torch.allclose(a0[m] @ a1[m].t(), torch.zeros(4, 4), atol=1e-6), m


def _train_units(tiny_llama, qa_files, tmp_path, **settings) -> dict:
    from lorasum.study.plan import plan_study
    from lorasum.study.reproduce import resolve
    from lorasum.study.tasks import TrainTask

    overrides = dict(
        model=str(tiny_llama), domains=qa_domains(qa_files, 2), max_order=2, **settings
    )
    study = resolve(tmp_path / "never-written", "tiny", None, overrides, False)
    return {t.name: t for t in plan_study(study.layout).of_type(TrainTask)}


@pytest.mark.parametrize("policy", ["frozen", "disjoint"])
def test_equal_params_doubles_the_singles_rank_and_keeps_the_merged_baseline(
    policy, tiny_llama, qa_files, tmp_path
):
    plain = _train_units(tiny_llama, qa_files, tmp_path, lora_a=policy)
    equal = _train_units(tiny_llama, qa_files, tmp_path, lora_a=policy, equal_params=True)
    assert not (tmp_path / "never-written").exists()
    names = list(qa_files)[:2]
    merged = f"merged-{'+'.join(names)}"
    # the merged-data adapter is the same unit (same key: a copied study directory reuses it)
    assert equal[merged].key() == plain[merged].key()
    assert equal[merged].cfg.rank == plain[merged].cfg.rank
    assert equal[merged].cfg.lora_a == "trained"
    for i, n in enumerate(names):
        cfg, base = equal[n].cfg, plain[n].cfg
        assert (cfg.rank, cfg.alpha) == (2 * base.rank, 2 * base.alpha)  # scale α/r kept
        assert cfg.lora_a == policy and cfg.a_slot == (i if policy == "disjoint" else 0)
        assert equal[n].key() != plain[n].key()


def test_equal_params_needs_a_frozen_a(tiny_llama, qa_files, tmp_path, capsys):
    out = tmp_path / "deep" / "out"
    argv = [
        "reproduce",
        "--preset",
        "tiny",
        "--model",
        str(tiny_llama),
        "--domains",
        ",".join(qa_domains(qa_files, 2)),
        "--max-order",
        "2",
        "--out",
        str(out),
        "--equal-params",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "add --lora-a frozen or --lora-a disjoint" in err[0], err
    assert not (tmp_path / "deep").exists()
