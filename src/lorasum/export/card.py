"""Text written beside an exported GGUF adapter: an Ollama Modelfile and a model card with
the exact llama.cpp command lines."""

from __future__ import annotations

import shlex
from pathlib import Path

CARD_MARK = "<!-- written by lorasum export -->"  # lets a re-export replace its own files


def modelfile(base_gguf: Path | None, adapter_gguf: Path) -> str:
    """Ollama's Modelfile: the base GGUF model and the adapter applied on top."""
    base = str(base_gguf.resolve()) if base_gguf else "./base.gguf  # the base model's GGUF"
    return f"FROM {base}\nADAPTER {adapter_gguf.resolve()}\n"


def model_card(info: dict) -> str:
    """README.md for an exported adapter: what it is, its base, how to run it."""
    adapter = Path(info["gguf"]).resolve()
    base = info.get("base_gguf")
    base_arg = shlex.quote(base) if base else "base.gguf"
    a = shlex.quote(str(adapter))
    if base:
        base_line = f"Base model GGUF: `{base}` (sha256 `{info['base_gguf_sha256']}`)."
    else:
        base_line = (
            f"Base model: `{info['base_model']}`; no GGUF of it is known here: convert it with "
            "llama.cpp's `convert_hf_to_gguf.py` and use that file as `base.gguf`."
        )
    types = ", ".join(f"{n} × {t}" for t, n in sorted(info["tensor_types"].items()))
    return (
        f"{CARD_MARK}\n"
        f"# GGUF LoRA adapter ({info['arch']})\n\n"
        f"Exported by lorasum {info['lorasum_version']} from `{info['adapter']}` with\n\n"
        f"```bash\n{info['command']}\n```\n\n"
        f"{base_line}\n\n"
        f"{info['modules']} modules, rank {info['rank']}, `adapter.lora.alpha` = "
        f"{info['alpha']:g} (llama.cpp scales each module by alpha / rank: ΔW equals the "
        f"adapter's s·B·A); tensors: {types}.\n\n"
        "## llama.cpp\n\n"
        "```bash\n"
        f"llama-cli -m {base_arg} --lora {a} -p 'Question: …'\n"
        "# several adapters at once: their ΔW are summed at serve time\n"
        f"llama-cli -m {base_arg} --lora {a} --lora other.gguf\n"
        "# a weighted sum\n"
        f"llama-cli -m {base_arg} --lora-scaled {a} 0.5 --lora-scaled other.gguf 0.5\n"
        "# bake the adapter into a model file\n"
        f"llama-export-lora -m {base_arg} --lora {a} -o merged.gguf\n"
        "```\n\n"
        "## Ollama\n\n"
        "```bash\n"
        f"ollama create my-adapter -f {shlex.quote(str(adapter.parent / 'Modelfile'))}\n"
        "ollama run my-adapter\n"
        "```\n"
    )


def merged_card(info: dict) -> str:
    """README.md for a merged model file: its base, the requantisation error, how to run it."""
    model = shlex.quote(str(Path(info["gguf"]).resolve()))
    fallback = info["f32_fallback"]
    kept = (
        f"{len(fallback)} weights whose base type the gguf package cannot write are stored as F32."
        if fallback
        else "Every merged weight is stored in the type it has in the base file."
        if info["outtype"] == "base"
        else f"Merged weights are stored as {info['outtype'].upper()}."
    )
    return (
        f"{CARD_MARK}\n"
        f"# Merged GGUF model ({info['arch']})\n\n"
        f"Written by lorasum {info['lorasum_version']}: the base model with the adapter "
        f"`{info['adapter']}` added to {info['merged_tensors']} weights, with\n\n"
        f"```bash\n{info['command']}\n```\n\n"
        f"Base model GGUF: `{info['base_gguf']}` (sha256 `{info['base_gguf_sha256']}`). "
        f"{kept} Writing W + ΔW adds an error relative to ΔW of "
        f"{info['requant_error_median']:.3g} (median over weights; max "
        f"{info['requant_error_max']:.3g}); 0 means ΔW is kept exactly, 1 means the "
        "requantisation noise is as large as ΔW itself.\n\n"
        "## llama.cpp\n\n"
        f"```bash\nllama-cli -m {model} -p 'Question: …'\nllama-server -m {model}\n```\n\n"
        "## Ollama\n\n"
        "```bash\n"
        f"ollama create my-model -f {shlex.quote(str(Path(info['gguf']).resolve().parent / 'Modelfile'))}\n"
        "ollama run my-model\n"
        "```\n"
    )
