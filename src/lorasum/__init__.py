"""lorasum: modular fine-tuning by adding LoRA adapters.

Train per-domain LoRA adapters, compose them exactly (ΔW = Σ w·s·B·A), measure how orthogonal
they are in factored form, evaluate answer-only perplexity, and run the naive-summation study.
"""

from lorasum.errors import LorasumError

__version__ = "0.1.0"
__all__ = ["LorasumError", "__version__"]
