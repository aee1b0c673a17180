"""Output safety and edge cases: --overwrite never deletes foreign data, bad targets, BOS, seeds."""

import json

import pytest
from conftest import load_tiny, make_adapter

from lorasum.cli import main
from lorasum.compose import compose
from lorasum.data import QA, tokenize_qa
from lorasum.errors import LorasumError
from lorasum.study.reproduce import reproduce
from lorasum.training import TrainConfig, train


def test_overwrite_never_replaces_a_directory_lorasum_did_not_write(
    tiny_llama, qa_files, tmp_path, capsys
):
    foreign = tmp_path / "my_stuff"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    code = main(
        [
            "train",
            "--model",
            str(tiny_llama),
            "--data",
            str(qa_files["arith"]),
            "--out",
            str(foreign),
            "--max-steps",
            "1",
            "--overwrite",
        ]
    )
    assert code == 2 and "did not write" in capsys.readouterr().err
    assert (foreign / "precious.txt").read_text() == "keep me"
    with pytest.raises(LorasumError, match="no lorasum study"):
        reproduce(
            foreign,
            preset="tiny",
            model=str(tiny_llama),
            domains=[f"{n}={p}" for n, p in qa_files.items()],
            overwrite=True,
            progress=False,
        )
    assert sorted(p.name for p in foreign.iterdir()) == ["precious.txt"]


def test_non_linear_target_modules_are_refused_and_model_untouched(tiny_llama, qa_files, tmp_path):
    model = load_tiny(tiny_llama)
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    cfg = TrainConfig(
        model=str(tiny_llama),
        data=[str(qa_files["arith"])],
        target_modules="mlp",
        max_steps=1,
        eval_val=False,
    )
    with pytest.raises(LorasumError, match="not linear layers"):
        train(cfg, tmp_path / "a", model=model, progress=False)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert not (tmp_path / "a").exists()


def test_non_finite_weights_are_refused(tiny_llama, tmp_path):
    a = make_adapter(tiny_llama, tmp_path / "a", seed=1)
    with pytest.raises(LorasumError, match="finite"):
        compose([a], tmp_path / "out", weights="nan")
    assert not (tmp_path / "out").exists()


class _BosTokenizer:
    """A tokenizer that prepends BOS (id 1), one id per character."""

    bos_token_id, eos_token_id = 1, 2

    def __call__(self, text, add_special_tokens=True):
        ids = [10 + (ord(c) % 50) for c in text]
        return {"input_ids": ([1] if add_special_tokens else []) + ids}


def test_left_truncation_keeps_bos():
    tok = _BosTokenizer()
    t = tokenize_qa(tok, QA("x" * 100, "yes"), max_length=32)
    assert len(t.input_ids) == 32 and t.input_ids[0] == 1
    assert t.input_ids[-1] == 2 and sum(t.counted) == len(" yes") + 1


def test_renamed_domains_and_seed_per_domain(tiny_llama, qa_files, tmp_path):
    out = tmp_path / "study"
    files = list(qa_files.values())[:2]
    reproduce(
        out,
        preset="tiny",
        model=str(tiny_llama),
        domains=[f"a={files[0]}", f"b={files[1]}"],
        progress=False,
    )
    # same data under new names: cached evaluations must not be reused under the old names
    res = reproduce(
        out,
        preset="tiny",
        model=str(tiny_llama),
        overwrite=True,
        progress=False,
        domains=[f"x={files[0]}", f"y={files[1]}"],
        seed_per_domain=True,
    )
    assert res["combinations"][0]["domains"] == ["x", "y"]
    seeds = [
        json.loads((out / "seed-42" / "adapters" / n / "lorasum.json").read_text())["config"][
            "seed"
        ]
        for n in ("x", "y")
    ]
    assert seeds[0] != seeds[1]
    with pytest.raises(LorasumError, match="one data source for two domains"):
        reproduce(
            tmp_path / "s2",
            preset="tiny",
            model=str(tiny_llama),
            domains=[f"x={files[0]}", f"y={files[0]}"],
            progress=False,
        )


def test_several_seeds_give_means_intervals_and_reuse(tiny_llama, qa_files, tmp_path):
    out = tmp_path / "study"
    domains = [f"{n}={p}" for n, p in list(qa_files.items())[:2]]
    res = reproduce(
        out, preset="tiny", model=str(tiny_llama), domains=domains, seeds=[1, 2], progress=False
    )
    (row,) = res["combinations"]
    assert [p["seed"] for p in row["per_seed"]] == [1, 2]
    per_seed = [p["delta_pct"] for p in row["per_seed"]]
    assert row["delta_pct"] == pytest.approx(sum(per_seed) / 2)
    assert per_seed[0] != per_seed[1]  # seeds really differ
    lo, hi = row["ci95"]["delta_pct"]
    assert lo < row["delta_pct"] < hi
    assert res["correlation"]["n"] == 2  # one point per (combination, seed)
    weights = out / "seed-1" / "adapters" / domains[0].split("=")[0] / "adapter_model.safetensors"
    stamp = weights.stat().st_mtime_ns
    res3 = reproduce(
        out,
        preset="tiny",
        model=str(tiny_llama),
        domains=domains,
        seeds=[1, 2, 3],
        overwrite=True,
        progress=False,
    )
    assert weights.stat().st_mtime_ns == stamp  # finished seeds are reused
    assert len(res3["combinations"][0]["per_seed"]) == 3
    assert "95%" in (out / "report.md").read_text()
    with pytest.raises(LorasumError, match="repeats"):
        reproduce(
            tmp_path / "s2",
            preset="tiny",
            model=str(tiny_llama),
            domains=domains,
            seeds=[1, 1],
            progress=False,
        )


def test_reproduce_with_bad_targets_writes_nothing(tiny_llama, qa_files, tmp_path):
    with pytest.raises(LorasumError, match="not found"):
        reproduce(
            tmp_path / "study",
            preset="tiny",
            model=str(tiny_llama),
            domains=[f"{n}={p}" for n, p in qa_files.items()],
            target_modules="nope",
            progress=False,
        )
    assert not (tmp_path / "study").exists()
