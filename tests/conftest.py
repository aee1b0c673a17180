"""Tiny models, tokenizers and QA data built inside the tests: no network, seconds to make."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

VOCAB = 320


def _tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def make_qa(domain: str, n: int, seed: int = 0) -> list[dict]:
    """Synthetic QA rows of three distinguishable 'domains'."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        if domain == "arith":
            rows.append({"question": f"What is {a} plus {b}?", "answer": str(a + b)})
        elif domain == "colors":
            c = rng.choice(["red", "green", "blue", "yellow", "purple"])
            rows.append({"question": f"Which colour is item {a}?", "answer": f"Item {a} is {c}."})
        else:
            w = rng.choice(["cash", "bonds", "stocks", "gold"])
            rows.append(
                {"question": f"Should I hold {w} for {a} years?", "answer": f"Hold {w} {b}%."}
            )
    return rows


def qa_domains(qa_files: dict[str, Path], n: int = 3) -> list[str]:
    """The first ``n`` tiny QA files as a study's ``name=path`` domains."""
    return [f"{name}={path}" for name, path in list(qa_files.items())[:n]]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _corpus() -> list[str]:
    texts = []
    for d in ("arith", "colors", "finance"):
        for r in make_qa(d, 200, seed=1):
            texts.append(f"Question: {r['question']}\nAnswer: {r['answer']}")
    return texts


def build_tiny_model(kind: str, out: Path) -> Path:
    """Save a tiny random `llama` or `gpt2` causal LM + tokenizer to ``out``."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    torch.manual_seed(0)
    tokenizer = _tokenizer(_corpus())
    if kind == "llama":
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            tie_word_embeddings=True,
            eos_token_id=tokenizer.eos_token_id,
        )
    else:
        config = GPT2Config(
            vocab_size=len(tokenizer),
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=128,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.eos_token_id,
        )
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def rel_tol(precision: str, fp32: float, bf16: float) -> float:
    """A comparison's relative tolerance for the precision its run used (``"fp32"`` or
    ``"bf16"``, as lorasum records it): every test comparing two computations under
    ``precision: auto`` states both, since `make test` runs it under each (the machine's own
    verdict, and the ``precision`` subset with LORASUM_PRECISION forced to bf16 and fp32)."""
    return {"fp32": fp32, "bf16": bf16}[precision]


def run_precision() -> str:
    """What ``precision: auto`` resolves to on this CPU in this run (LORASUM_PRECISION or the
    machine's verdict)."""
    from lorasum.models import resolve_precision

    return resolve_precision("auto", torch.device("cpu"))


def pytest_configure(config):
    """One precision for the whole run, subprocesses included: LORASUM_PRECISION as given (the
    forced runs of `make test`), else this CPU's own verdict, measured once here. Tests of the
    verdict itself unset it and fake the CPU."""
    from lorasum.models import PRECISION_ENV

    if not os.environ.get(PRECISION_ENV):
        os.environ[PRECISION_ENV] = run_precision()
        config._lorasum_precision = f"{os.environ[PRECISION_ENV]} (this CPU's verdict)"
    else:
        config._lorasum_precision = f"{os.environ[PRECISION_ENV]} (LORASUM_PRECISION)"


def pytest_report_header(config):
    return f"lorasum precision: {config._lorasum_precision}"


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` are collected everywhere (a syntax and import check) and run only
    where torch sees a CUDA GPU; `bash benchmarks/gpu_check.sh` runs them on one."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return build_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    return build_tiny_model("gpt2", tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(params=["llama", "gpt2"])
def tiny_model(request, tiny_llama, tiny_gpt2) -> Path:
    return tiny_llama if request.param == "llama" else tiny_gpt2


@pytest.fixture(scope="session")
def qa_files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("qa")
    return {
        name: write_jsonl(d / f"{name}.jsonl", make_qa(name, 60, seed=i))
        for i, name in enumerate(("arith", "colors", "finance"))
    }


@pytest.fixture(autouse=True)
def _own_calibration_cache(monkeypatch, tmp_path_factory):
    """Each test its own calibration cache (it is shared across studies under $LORASUM_HOME):
    tests that count forward passes must not find another test's statistics."""
    import lorasum.analysis.calibration

    path = tmp_path_factory.mktemp("calibration")
    monkeypatch.setattr(lorasum.analysis.calibration, "cache_dir", lambda: path)


@pytest.fixture(autouse=True)
def _own_spectra_cache(monkeypatch, tmp_path_factory):
    """Each test its own eigenpair cache (shared across compositions under $LORASUM_HOME)."""
    import lorasum.methods.projection

    path = tmp_path_factory.mktemp("spectra")
    monkeypatch.setattr(lorasum.methods.projection, "spectra_dir", lambda: path)


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # Studies run their units inline unless a test asks for worker processes.
    monkeypatch.setenv("LORASUM_WORKERS", "1")


def load_tiny(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def make_adapter(
    model_dir: Path,
    out: Path,
    r: int = 4,
    alpha: float = 8.0,
    targets: list[str] | None = None,
    seed: int = 0,
    use_rslora: bool = False,
) -> Path:
    """A PEFT LoRA adapter with random, non-zero A *and* B (so ΔW ≠ 0)."""
    from peft import LoraConfig, get_peft_model

    model = load_tiny(model_dir)
    if targets is None:
        targets = (
            ["c_attn", "c_proj"]
            if model.config.model_type == "gpt2"
            else ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]
        )
    torch.manual_seed(seed)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=targets,
        init_lora_weights=False,
        fan_in_fan_out=model.config.model_type == "gpt2",
        use_rslora=use_rslora,
        task_type="CAUSAL_LM",
        base_model_name_or_path=str(model_dir),
    )
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(out)
    return out
