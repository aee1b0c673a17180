"""Exports of adapters for the tools people run models with (llama.cpp, Ollama)."""

from lorasum.export.gguf_lora import OUTTYPES, GgufBase, lora_tensors, write_gguf_lora
from lorasum.export.lora import export_adapter
from lorasum.export.merged import export_merged

__all__ = [
    "OUTTYPES",
    "GgufBase",
    "export_adapter",
    "export_merged",
    "lora_tensors",
    "write_gguf_lora",
]
