"""Calibration statistics: Σ x xᵀ over non-padding tokens equals the raw inputs' Gram matrix,
does not depend on batch size, padding or the pad token, is cached beside the adapter (reused
without a forward pass, invalidated when the adapter or data change), and the compose CLI's
calibrated methods write adapters whose logits equal base + the method's ΔW by hand."""

import pytest
import torch
from conftest import load_tiny, make_adapter
from test_compose_methods import logits_with_delta, peft_logits
from test_interference import projection_reference, regmean_reference

from lorasum.adapters import read_adapter
from lorasum.analysis import calibration
from lorasum.analysis.calibration import (
    FILE_PREFIX,
    calibrate,
    calibrate_adapters,
    parse_calibration,
)
from lorasum.cli import main
from lorasum.compose import compose
from lorasum.data import load_split, tokenize_split
from lorasum.errors import LorasumError
from lorasum.factors import single_threaded
from lorasum.io import read_json
from lorasum.models import load_tokenizer
from lorasum.training import TrainConfig, train

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny forward passes: threaded BLAS only stalls when another job holds a core."""
    with single_threaded():
        yield


def _explicit_gram(model, tok, source_file, module: str) -> tuple[torch.Tensor, int]:
    """Σ x xᵀ at ``module`` from its raw inputs, one unpadded sequence at a time."""
    items = tokenize_split(tok, [load_split(str(source_file), 42)], "train", 32)
    xs = []
    hook = model.get_submodule(module).register_forward_hook(
        lambda mod, args, out: xs.append(args[0].reshape(-1, args[0].shape[-1]).double())
    )
    try:
        with torch.inference_mode():
            for t, _ in items:
                model(input_ids=torch.tensor([t.input_ids]))
    finally:
        hook.remove()
    X = torch.cat(xs)  # (n, d_in)
    return X.T @ X, X.shape[0]


def _assert_same(a, b, rtol=1e-5):
    assert a.tokens == b.tokens
    assert sorted(a.grams) == sorted(b.grams)
    for m in a.grams:
        err = float((a.grams[m] - b.grams[m]).norm() / b.grams[m].norm())
        assert err < rtol, (m, err)


def test_grams_equal_raw_inputs_and_ignore_batching_padding_and_pad_id(
    tiny_model, qa_files, tmp_path
):
    adapter = make_adapter(tiny_model, tmp_path / "a", r=2)
    model, tok = load_tiny(tiny_model), load_tokenizer(str(tiny_model))
    data = [str(qa_files["arith"])]

    def run(batch_size, tokenizer=tok):
        return calibrate(
            adapter,
            data,
            model=model,
            tokenizer=tokenizer,
            max_length=32,
            batch_size=batch_size,
            cache=False,
        )

    one = run(1)  # no padding at all
    assert one.computed and one.path is None
    for module in ("model.layers.1.mlp.down_proj", "transformer.h.1.mlp.c_proj"):
        if module in one.grams:  # llama Linear / gpt2 Conv1D
            G, n = _explicit_gram(model, tok, qa_files["arith"], module)
            assert one.tokens[module] == n
            assert float((one.grams[module] - G).norm() / G.norm()) < 1e-5
    _assert_same(run(7), one)  # padded batches
    other_pad = load_tokenizer(str(tiny_model))
    other_pad.pad_token = other_pad.convert_ids_to_tokens(57)
    assert other_pad.pad_token_id != tok.pad_token_id
    _assert_same(run(7, other_pad), one)


def test_modules_reading_one_input_share_one_matrix(tiny_llama, qa_files, tmp_path):
    adapter = make_adapter(tiny_llama, tmp_path / "a", r=2)
    cal = calibrate(adapter, [str(qa_files["colors"])], model=load_tiny(tiny_llama), max_length=32)
    q, k, v = (cal.grams[f"model.layers.0.self_attn.{p}_proj"] for p in "qkv")
    assert torch.equal(q, k) and torch.equal(q, v)
    assert not torch.equal(q, cal.grams["model.layers.0.self_attn.o_proj"])
    again = calibrate(adapter, [str(qa_files["colors"])], max_length=32)  # from the file
    assert not again.computed
    _assert_same(again, cal, rtol=1e-6)  # stored in fp32
    for c in (cal, again):  # one object in memory, normalised once: the methods cache by it
        g, n = c.grams, c.normalised()
        assert g["model.layers.0.self_attn.q_proj"] is g["model.layers.0.self_attn.v_proj"]
        assert n["model.layers.0.self_attn.q_proj"] is n["model.layers.0.self_attn.k_proj"]
        assert n["model.layers.0.self_attn.q_proj"] is not n["model.layers.0.self_attn.o_proj"]
        # in place (compose): the same matrices bitwise, still shared, and the sums given up
        taken = c.take_normalised()
        assert taken.keys() == n.keys() and all(torch.equal(taken[m], n[m]) for m in n)
        assert taken["model.layers.0.self_attn.q_proj"] is taken["model.layers.0.self_attn.v_proj"]
        assert taken["model.layers.0.self_attn.q_proj"] is g["model.layers.0.self_attn.q_proj"]
        assert c.grams == {}


def test_cache_stores_packed_triangles_and_reads_square_files(tiny_llama, qa_files, tmp_path):
    from safetensors.torch import load_file, save_file

    from lorasum.analysis.calibration import _read_cache, pack_symmetric, unpack_symmetric

    G = torch.randn(7, 5, dtype=torch.float64)
    G = G @ G.T
    G = (G + G.T) / 2  # a float product is not bitwise symmetric
    assert torch.equal(unpack_symmetric(pack_symmetric(G)), G)
    assert pack_symmetric(G).shape == (28,)
    adapter = make_adapter(tiny_llama, tmp_path / "a", r=2)
    cal = calibrate(adapter, [str(qa_files["arith"])], model=load_tiny(tiny_llama), max_length=32)
    tensors = load_file(str(cal.path))
    assert all(t.ndim == 1 for t in tensors.values())  # packed on disk
    # a file from before packing (square fp32 matrices) is read as it is
    from safetensors import safe_open

    with safe_open(str(cal.path), framework="pt") as f:
        meta = f.metadata()
    square = {k: unpack_symmetric(t) for k, t in tensors.items()}
    save_file(square, str(cal.path), metadata=meta)
    old = _read_cache(cal.path, cal.key)
    _assert_same(old, cal, rtol=1e-12)
    fresh = calibrate(
        adapter, [str(qa_files["arith"])], model=load_tiny(tiny_llama), max_length=32, cache=False
    )
    assert fresh.computed
    assert all(torch.equal(fresh.grams[m], cal.grams[m]) for m in cal.grams)  # as on disk


def test_cache_is_reused_without_a_forward_pass_and_invalidated_by_changes(
    tiny_llama, qa_files, tmp_path
):
    adapter = make_adapter(tiny_llama, tmp_path / "a", r=2, seed=1)
    model = load_tiny(tiny_llama)
    forwards = []
    model.get_submodule("model.layers.0").register_forward_pre_hook(lambda *a: forwards.append(1))

    def run(source="arith"):
        return calibrate(adapter, [str(qa_files[source])], model=model, max_length=32)

    first = run()
    assert first.computed and first.path.is_file() and first.path.parent == calibration.cache_dir()
    assert first.path.name == f"{FILE_PREFIX}{first.key}.safetensors"
    assert not list(adapter.glob(f"{FILE_PREFIX}*"))  # nothing written into the adapter
    n = len(forwards)
    assert n > 0
    second = run()
    assert not second.computed and len(forwards) == n  # no forward pass
    _assert_same(second, first)

    other_data = run("finance")  # other data: another key, both files kept
    assert other_data.computed and other_data.key != first.key
    assert first.path.is_file()
    shorter = calibrate(adapter, [str(qa_files["arith"])], model=model, max_length=16)
    assert shorter.computed and shorter.key not in (first.key, other_data.key)

    # The statistics are the base model's on the domain's data: another adapter of the same
    # domain (another seed, or these weights retrained in place) reuses them, no forward pass.
    n = len(forwards)
    make_adapter(tiny_llama, adapter, r=2, seed=2)
    other = make_adapter(tiny_llama, tmp_path / "b", r=2, seed=3)
    for a in (adapter, other):
        again = calibrate(a, [str(qa_files["arith"])], model=model, max_length=32)
        assert not again.computed and again.key == first.key
        _assert_same(again, first)
    assert len(forwards) == n
    assert not list(calibration.cache_dir().glob(".*tmp"))  # nothing half-written
    read_adapter(adapter, strict=True)  # the adapter still reads and composes


# --- trained adapters: default data, compose CLI -----------------------------------------------


@pytest.fixture(scope="module")
def trained_pair(tiny_llama, qa_files, tmp_path_factory):
    d = tmp_path_factory.mktemp("trained")
    paths = []
    for name in ("arith", "colors"):
        cfg = TrainConfig(
            model=str(tiny_llama),
            data=[str(qa_files[name])],
            max_steps=6,
            lr=3e-3,
            batch_size=8,
            max_length=32,
            dropout=0.0,
            eval_val=False,
            warmup_steps=0,
            precision="fp32",
            device="cpu",
            max_train=24,
        )
        train(cfg, d / name, progress=False)
        paths.append(d / name)
    return paths


def test_default_data_is_the_adapters_recorded_training_split(trained_pair, tiny_llama, tmp_path):
    cal = calibrate(trained_pair[0], model=load_tiny(tiny_llama), cache=False)
    (info,) = cal.info["data"].values()
    assert info["train"]["n"] == 24  # max_train from lorasum.json
    assert cal.info["max_length"] == 32 and cal.info["rows"] == 24
    elsewhere = make_adapter(tiny_llama, tmp_path / "elsewhere", r=2)
    with pytest.raises(LorasumError, match="no lorasum.json recording its training data"):
        calibrate(elsewhere)
    assert parse_calibration(["own", "a.jsonl,b.jsonl"], 2) == [None, ["a.jsonl", "b.jsonl"]]
    with pytest.raises(LorasumError, match="1 entries for 2 adapters"):
        parse_calibration(["a.jsonl"], 2)


def _deltas(paths) -> list[dict[str, torch.Tensor]]:
    return [
        {m: f.scale * f.B.double() @ f.A.double() for m, f in read_adapter(p).modules.items()}
        for p in paths
    ]


def test_compose_cli_regmean_writes_base_plus_its_delta(trained_pair, tiny_llama, tmp_path, capsys):
    out = tmp_path / "regmean"
    rc = main(
        [
            "compose",
            *map(str, trained_pair),
            "--method",
            "regmean",
            "--regmean-alpha",
            "0.8",
            "--out",
            str(out),
        ]
    )
    assert rc == 0, capsys.readouterr().err
    grams = [c.normalised() for c in calibrate_adapters(trained_pair)]  # cache hits
    deltas = _deltas(trained_pair)
    by_hand = {
        m: regmean_reference([d[m] for d in deltas], [g[m] for g in grams], 0.8).float()
        for m in deltas[0]
    }
    expected = logits_with_delta(tiny_llama, by_hand)
    got = peft_logits(tiny_llama, out)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4)
    recipe = read_json(out / "recipe.json")
    assert recipe["method"] == "regmean" and recipe["options"]["regmean_alpha"] == 0.8
    assert len(recipe["calibration"]) == 2 and recipe["calibration"][0]["rows"] == 24
    assert "--calibration own own" in recipe["command"]


def test_compose_projection_with_explicit_calibration_and_refusals(
    trained_pair, tiny_llama, qa_files, tmp_path, capsys
):
    sources = [str(qa_files["arith"]), str(qa_files["finance"])]
    out = tmp_path / "proj"
    compose(trained_pair, out, method="orthogonal_projection", calibration=sources)
    grams = [calibrate(p, [s]).normalised() for p, s in zip(trained_pair, sources, strict=True)]
    assert all(not calibrate(p, [s]).computed for p, s in zip(trained_pair, sources, strict=True))
    deltas = _deltas(trained_pair)
    by_hand = {
        m: projection_reference([d[m] for d in deltas], [g[m] for g in grams], 4.0)[0].float()
        for m in deltas[0]
    }
    assert torch.allclose(
        peft_logits(tiny_llama, out), logits_with_delta(tiny_llama, by_hand), atol=1e-5, rtol=1e-4
    )

    elsewhere = make_adapter(tiny_llama, tmp_path / "elsewhere", r=2)
    capsys.readouterr()  # drop the model loads' progress bars above: only main's lines count
    rc = main(
        [
            "compose",
            str(trained_pair[0]),
            str(elsewhere),
            "--method",
            "regmean",
            "--out",
            str(tmp_path / "x"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "lorasum.json" in err and "--calibration" in err
    assert not (tmp_path / "x").exists()
    rc = main(
        [
            "compose",
            *map(str, trained_pair),
            "--calibration",
            "own",
            "own",
            "--out",
            str(tmp_path / "y"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "--calibration does not apply to sum" in err
