"""lorasum: modular fine-tuning by adding LoRA adapters.

Train per-domain LoRA adapters, compose them exactly (ΔW = Σ w·s·B·A) or by another merge
method, measure how alike they are in factored form, evaluate answer-only perplexity, and run
the naive-summation study.

The Python API mirrors the CLI:

    import lorasum
    lorasum.compose(["a", "b"], "out", method="svd", rank=16)
    lorasum.similarity(["a", "b", "c"], plot="plots/")
    lorasum.add_weighted_adapter(peft_model, ["a", "b"], method="sum")  # in memory

(``lorasum.compose`` and ``lorasum.similarity`` are these functions; their modules are
``sys.modules["lorasum.compose"]`` and ``lorasum.analysis.similarity``, imported as
``from lorasum.compose import …``.)
"""

from lorasum._version import __version__
from lorasum.analysis.similarity import similarity
from lorasum.compose import compose
from lorasum.errors import LorasumError
from lorasum.methods import MergeConfig, method_names
from lorasum.peft_live import add_weighted_adapter

__all__ = [
    "LorasumError",
    "MergeConfig",
    "__version__",
    "add_weighted_adapter",
    "compose",
    "method_names",
    "similarity",
]
