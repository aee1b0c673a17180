"""Composing PEFT-made adapters by every kind of method: logits against W + ΔW merged by hand,
the recipe and model card, and one clear refusal (nothing written) for what cannot be composed."""

import hashlib
import json
import shlex

import pytest
import torch
from conftest import load_tiny, make_adapter
from test_methods import iso_reference, tsv_reference

from lorasum.cli import main
from lorasum.compose import compose
from lorasum.errors import LorasumError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

IDS = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))


def peft_adapter(model_dir, out, seed, **lora_kwargs):
    """A PEFT LoRA adapter with random non-zero A and B and any LoraConfig options."""
    from peft import LoraConfig, get_peft_model

    model = load_tiny(model_dir)
    torch.manual_seed(seed)
    config = LoraConfig(
        init_lora_weights=False,
        task_type="CAUSAL_LM",
        base_model_name_or_path=str(model_dir),
        **lora_kwargs,
    )
    get_peft_model(model, config).save_pretrained(out)
    return out


def peft_deltas(model_dir, path) -> dict[str, torch.Tensor]:
    """PEFT's own ΔW per module, in (d_out, d_in) orientation (Conv1D transposed back)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_tiny(model_dir), str(path))
    out = {}
    for name, module in model.base_model.model.named_modules():
        if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}):
            d = module.get_delta_weight("default").detach().float()
            out[name] = d.T if module.fan_in_fan_out else d
    return out


def logits_with_delta(model_dir, deltas: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits of the base model with W + ΔW written into its weights by hand."""
    from transformers.pytorch_utils import Conv1D

    model = load_tiny(model_dir)
    with torch.no_grad():
        for name, d in deltas.items():
            module = model.get_submodule(name)
            module.weight += d.T if isinstance(module, Conv1D) else d
        return model(input_ids=IDS).logits


def peft_logits(model_dir, adapter_dir) -> torch.Tensor:
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_tiny(model_dir), str(adapter_dir)).eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def best_rank(d: torch.Tensor, k: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(d.double(), full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k]


@pytest.fixture(scope="module")
def llama_mixed(tiny_llama, tmp_path_factory):
    """Three llama adapters: mixed ranks, alphas, rsLoRA, rank/alpha patterns, target sets."""
    d = tmp_path_factory.mktemp("mixed")
    a = peft_adapter(
        tiny_llama,
        d / "a",
        1,
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
        rank_pattern={"v_proj": 2, "down_proj": 6},
        alpha_pattern={"o_proj": 32},
    )
    b = peft_adapter(
        tiny_llama,
        d / "b",
        2,
        r=3,
        lora_alpha=16,
        use_rslora=True,
        target_modules=["q_proj", "k_proj", "down_proj"],
    )
    c = peft_adapter(tiny_llama, d / "c", 3, r=2, lora_alpha=2, target_modules=["v_proj"])
    return tiny_llama, [a, b, c]


def _oracle(method, deltas_per_adapter, weights, names):
    """The dense merged ΔW per module, from PEFT's ΔW_i (missing module = zero)."""
    from peft.utils import merge_utils

    out = {}
    for name in names:
        shape = next(d[name].shape for d in deltas_per_adapter if name in d)
        ds = [d.get(name, torch.zeros(shape)).double() for d in deltas_per_adapter]
        if method in ("sum", "svd"):
            out[name] = sum(w * d for w, d in zip(weights, ds, strict=True))
        elif method == "ties":
            out[name] = merge_utils.ties(
                [d.float() for d in ds], torch.tensor(weights), density=0.4
            ).double()
        elif method == "iso":
            total = sum(w * d for w, d in zip(weights, ds, strict=True))
            k = int(torch.linalg.matrix_rank(total, rtol=1e-6))
            out[name] = iso_reference(total, k, 0.7)
        elif method == "tsv":
            present = [w * d for w, d in zip(weights, ds, strict=True) if d.abs().max() > 0]
            out[name] = tsv_reference(present, min(shape) // len(ds), 1.0)
    return out


@pytest.mark.parametrize(
    "method, options",
    [
        ("sum", {}),
        ("svd", {"rank": 64}),  # ≥ Σr: exact
        ("ties", {"density": 0.4, "rank": 64}),  # ≥ min(d): the re-compression is exact
        ("iso", {"method_scale": 0.7}),
        ("tsv", {}),
    ],
)
def test_mixed_peft_adapters_compose_to_the_dense_merge(llama_mixed, tmp_path, method, options):
    model_dir, paths = llama_mixed
    weights = [1.0, -0.5, 2.0]
    deltas = [peft_deltas(model_dir, p) for p in paths]
    names = sorted(set().union(*deltas))
    compose(paths, tmp_path / "out", weights=weights, method=method, **options)
    expected = _oracle(method, deltas, weights, names)
    want = logits_with_delta(model_dir, {n: d.float() for n, d in expected.items()})
    got = peft_logits(model_dir, tmp_path / "out")
    base = load_tiny(model_dir)(input_ids=IDS).logits
    assert (want - base).abs().max() > 1e-2  # the merge really changes the output
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["lora_alpha"] == cfg["r"] and not cfg.get("rank_pattern")
    assert not cfg.get("alpha_pattern") and not cfg.get("modules_to_save")
    assert not cfg.get("use_dora") and sorted(cfg["target_modules"]) == names


def test_svd_below_total_rank_gives_the_best_rank_k_logits(llama_mixed, tmp_path):
    model_dir, paths = llama_mixed
    deltas = [peft_deltas(model_dir, p) for p in paths]
    names = sorted(set().union(*deltas))
    marker = compose(paths, tmp_path / "out", method="svd", rank=3)
    total = _oracle("sum", deltas, [1.0, 1.0, 1.0], names)
    want = logits_with_delta(model_dir, {n: best_rank(d, 3).float() for n, d in total.items()})
    torch.testing.assert_close(peft_logits(model_dir, tmp_path / "out"), want, rtol=1e-4, atol=1e-4)
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["r"] == 3
    report = marker["recipe"]["modules"]
    for name, d in total.items():
        S = torch.linalg.svdvals(d)
        kept = float((S[:3] ** 2).sum() / (S**2).sum())
        assert report[name]["kept_energy"] == pytest.approx(kept, abs=1e-5)


@pytest.mark.parametrize("method, options", [("sum", {}), ("dare_linear", {"density": 1.0})])
def test_gpt2_conv1d_adapters_compose_to_the_dense_merge(tiny_gpt2, tmp_path, method, options):
    a = make_adapter(tiny_gpt2, tmp_path / "a", r=2, alpha=16.0, seed=1)
    b = peft_adapter(
        tiny_gpt2,
        tmp_path / "b",
        2,
        r=3,
        lora_alpha=4,
        use_rslora=True,
        fan_in_fan_out=True,
        target_modules=["c_attn"],
    )
    deltas = [peft_deltas(tiny_gpt2, p) for p in (a, b)]
    names = sorted(set().union(*deltas))
    compose([a, b], tmp_path / "out", weights=[0.5, 1.5], method=method, **options)
    expected = _oracle("sum", deltas, [0.5, 1.5], names)
    want = logits_with_delta(tiny_gpt2, {n: d.float() for n, d in expected.items()})
    torch.testing.assert_close(peft_logits(tiny_gpt2, tmp_path / "out"), want, rtol=1e-4, atol=1e-4)
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["fan_in_fan_out"]


def test_transformers_loads_a_composed_adapter(tiny_llama, tmp_path):
    a = make_adapter(tiny_llama, tmp_path / "a", seed=1)
    b = make_adapter(tiny_llama, tmp_path / "b", seed=2)
    compose([a, b], tmp_path / "out", method="svd", rank="auto", keep=0.9, pad_rank_to=16)
    model = load_tiny(tiny_llama)
    model.load_adapter(str(tmp_path / "out"))
    with torch.no_grad():
        got = model(input_ids=IDS).logits
    torch.testing.assert_close(got, peft_logits(tiny_llama, tmp_path / "out"), rtol=1e-5, atol=1e-5)
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["r"] == 16


def test_recipe_model_card_and_the_recorded_command_reproduce_the_adapter(tiny_llama, tmp_path):
    a = make_adapter(tiny_llama, tmp_path / "a", r=2, seed=1)
    b = make_adapter(tiny_llama, tmp_path / "b", r=3, seed=2)
    marker = compose(
        [a, b], tmp_path / "out", weights="1,-1", method="dare_ties", density=0.5, seed=3
    )
    recipe = json.loads((tmp_path / "out" / "recipe.json").read_text())
    assert (
        recipe
        == marker["recipe"]
        == json.loads((tmp_path / "out" / "lorasum.json").read_text())["recipe"]
    )
    assert recipe["method"] == "dare_ties" and recipe["weights"] == [1.0, -1.0]
    assert recipe["options"] == {
        "density": 0.5,
        "majority_sign": "total",
        "rank": None,
        "seed": 3,
        "pad_rank_to": None,
    }
    assert recipe["lorasum_version"] == "0.1.0"
    sha = hashlib.sha256((a / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert recipe["inputs"][0]["weights_sha256"] == sha and recipe["inputs"][1]["r"] == 3
    assert all(0 < m["kept_energy"] <= 1 for m in recipe["modules"].values())
    card = (tmp_path / "out" / "README.md").read_text()
    assert recipe["command"] in card and "dare_ties" in card and sha[:16] in card
    # the command in the recipe is the truth: run it elsewhere, get the same adapter
    argv = shlex.split(recipe["command"])[1:]
    argv[argv.index("--out") + 1] = str(tmp_path / "again")
    assert main(argv) == 0
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "out" / name).read_bytes()


def test_merge_into_base_gets_the_recipe_too(tiny_llama, tmp_path):
    a = make_adapter(tiny_llama, tmp_path / "a", seed=1)
    b = make_adapter(tiny_llama, tmp_path / "b", seed=2)
    compose([a, b], tmp_path / "out", method="svd", rank=4, merge_into_base=tmp_path / "merged")
    recipe = json.loads((tmp_path / "merged" / "recipe.json").read_text())
    assert recipe["method"] == "svd" and recipe["merged_into"] == str(tiny_llama)
    assert "AutoModelForCausalLM" in (tmp_path / "merged" / "README.md").read_text()
    merged = load_tiny(tmp_path / "merged")
    with torch.no_grad():
        got = merged(input_ids=IDS).logits
    torch.testing.assert_close(got, peft_logits(tiny_llama, tmp_path / "out"), rtol=1e-4, atol=1e-4)


def test_plain_sum_keeps_its_key_so_studies_reuse_it(tiny_llama, tmp_path):
    from lorasum.adapters import read_adapter
    from lorasum.compose import adapter_fingerprint
    from lorasum.io import config_key

    a = make_adapter(tiny_llama, tmp_path / "a", seed=1)
    b = make_adapter(tiny_llama, tmp_path / "b", seed=2)
    marker = compose([a, b], tmp_path / "sum")
    old_key = config_key(
        {
            "sources": [adapter_fingerprint(read_adapter(p)) for p in (a, b)],
            "weights": [1.0, 1.0],
            "base_model": str(tiny_llama),
            "version": "0.1.0",
        }
    )
    assert marker["key"] == old_key
    mtime = (tmp_path / "sum" / "adapter_model.safetensors").stat().st_mtime_ns
    compose([a, b], tmp_path / "sum", overwrite=True, reuse_same=True)  # as experiment.py does
    assert (tmp_path / "sum" / "adapter_model.safetensors").stat().st_mtime_ns == mtime
    with pytest.raises(LorasumError, match="--overwrite"):
        compose([a, b], tmp_path / "sum", method="svd", rank=2)


# --- refusals: one line, nothing written -----------------------------------------------------


def _edit_config(path, **changes):
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return path


def _add_tensor(path, key):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path / "adapter_model.safetensors"))
    tensors[key] = torch.ones(4, 4)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    return path


def _bad_adapter(kind, tiny_llama, tiny_gpt2, d):
    if kind == "dora":
        return peft_adapter(tiny_llama, d / "bad", 5, r=2, target_modules=["q_proj"], use_dora=True)
    if kind == "dora_tensors_only":  # config says plain LoRA, the file holds DoRA magnitudes
        bad = peft_adapter(tiny_llama, d / "bad", 5, r=2, target_modules=["q_proj"], use_dora=True)
        return _edit_config(bad, use_dora=False)
    if kind == "bias_tensors_only":
        bad = peft_adapter(tiny_llama, d / "bad", 5, r=2, target_modules=["q_proj"], lora_bias=True)
        return _edit_config(bad, lora_bias=False)
    if kind == "lora_bias":
        return peft_adapter(
            tiny_llama, d / "bad", 5, r=2, target_modules=["q_proj"], lora_bias=True
        )
    if kind == "modules_to_save":
        return peft_adapter(
            tiny_llama, d / "bad", 5, r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]
        )
    if kind == "modules_to_save_tensor":
        bad = make_adapter(tiny_llama, d / "bad", seed=5)
        return _add_tensor(bad, "base_model.model.lm_head.modules_to_save.default.weight")
    if kind == "embedding":
        return peft_adapter(
            tiny_llama, d / "bad", 5, r=2, target_modules=["embed_tokens", "q_proj"]
        )
    if kind == "pissa":
        return _edit_config(make_adapter(tiny_llama, d / "bad", seed=5), init_lora_weights="pissa")
    if kind == "unknown_tensor":
        return _add_tensor(make_adapter(tiny_llama, d / "bad", seed=5), "base_model.model.extra.w")
    if kind == "fan_in_fan_out":
        return _edit_config(make_adapter(tiny_llama, d / "bad", seed=5), fan_in_fan_out=True)
    if kind == "other_architecture":  # same recorded base model, GPT-2 module names
        return _edit_config(
            make_adapter(tiny_gpt2, d / "bad", seed=5), base_model_name_or_path=str(tiny_llama)
        )
    if kind == "other_base":
        return _edit_config(
            make_adapter(tiny_llama, d / "bad", seed=5), base_model_name_or_path="x/y"
        )
    raise ValueError(kind)


REFUSALS = [
    ("dora", "uses DoRA"),
    ("dora_tensors_only", "DoRA magnitudes are not supported"),
    ("lora_bias", "LoRA bias"),
    ("bias_tensors_only", "LoRA bias terms are not supported"),
    ("modules_to_save", "has modules_to_save"),
    ("modules_to_save_tensor", "modules_to_save copies of whole modules cannot be composed"),
    ("embedding", "embedding LoRA is not supported"),
    ("pissa", "changes the base weights"),
    ("unknown_tensor", "not a LoRA factor of a linear module"),
    ("fan_in_fan_out", "adapters mix fan_in_fan_out settings"),
    ("other_architecture", "adapt modules of different model architectures"),
    ("other_base", "different base models"),
]


@pytest.mark.parametrize("kind, message", REFUSALS, ids=[k for k, _ in REFUSALS])
def test_what_cannot_be_composed_exactly_is_refused(tiny_llama, tiny_gpt2, tmp_path, kind, message):
    good = make_adapter(tiny_llama, tmp_path / "good", seed=1)
    bad = _bad_adapter(kind, tiny_llama, tiny_gpt2, tmp_path)
    with pytest.raises(LorasumError) as e:
        compose([good, bad], tmp_path / "out", method="svd", rank=2)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_llama_and_gpt2_adapters_without_base_names_are_refused(tiny_llama, tiny_gpt2, tmp_path):
    """The meaningless union of two architectures used to compose with exit 0."""
    a = _edit_config(make_adapter(tiny_llama, tmp_path / "a", seed=1), base_model_name_or_path=None)
    b = _edit_config(
        make_adapter(tiny_gpt2, tmp_path / "b", seed=2),
        base_model_name_or_path=None,
        fan_in_fan_out=False,
    )
    with pytest.raises(LorasumError, match="different model architectures"):
        compose([a, b], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_disjoint_targets_of_one_model_still_compose(tiny_llama, tmp_path):
    a = make_adapter(tiny_llama, tmp_path / "a", targets=["q_proj"], seed=1)
    b = make_adapter(tiny_llama, tmp_path / "b", targets=["down_proj"], seed=2)
    marker = compose([a, b], tmp_path / "out", method="svd", rank=4)
    assert len(marker["recipe"]["modules"]) == 4  # 2 layers × 2 module types


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "nope"], "unknown merge method 'nope'; choose one of: sum, weighted, mean"),
        (["--pad-rank-to", "3"], "--pad-rank-to 3 is below the rank this merge needs (8)"),
        (["--method", "mean", "--weights", "1,2"], "sets every weight to 1/N; drop --weights"),
        (["--method", "weighted"], "needs --weights"),
        (["--density", "0.5"], "--density does not apply to sum"),
        (["--method", "svd", "--rank", "auto", "--keep", "2"], "--keep 2.0: must be in (0, 1]"),
    ],
)
def test_cli_compose_refusals_exit_2_and_write_nothing(tiny_llama, tmp_path, capsys, args, message):
    a = make_adapter(tiny_llama, tmp_path / "a", seed=1)
    b = make_adapter(tiny_llama, tmp_path / "b", seed=2)
    capsys.readouterr()  # drop what building the adapters printed (a first model load's bar)
    code = main(["compose", str(a), str(b), "--out", str(tmp_path / "out"), *args])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("lorasum: error: ") and message in err
    assert err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_cli_compose_with_a_method(tiny_llama, tmp_path, capsys):
    a = make_adapter(tiny_llama, tmp_path / "a", seed=1)
    b = make_adapter(tiny_llama, tmp_path / "b", seed=2)
    argv = ["compose", str(a), str(b), "--out", str(tmp_path / "out"), "--method", "svd"]
    assert main([*argv, "--rank", "auto", "--keep", "0.95", "--pad-rank-to", "16"]) == 0
    out = capsys.readouterr().out
    assert "method svd, rank 16, 10 modules, kept energy min 0.9" in out
    recipe = json.loads((tmp_path / "out" / "recipe.json").read_text())
    assert recipe["options"] == {"keep": 0.95, "rank": "auto", "pad_rank_to": 16}
    assert recipe["needed_rank"] < 16 == recipe["rank"]
