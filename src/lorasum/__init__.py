"""lorasum: modular fine-tuning by adding LoRA adapters.

Train per-domain LoRA adapters, compose them exactly (ΔW = Σ w·s·B·A) or by another merge
method, measure how alike they are in factored form, evaluate answer-only perplexity, and run
the naive-summation study.

The Python API mirrors the CLI:

    import lorasum
    lorasum.compose(["a", "b"], "out", method="svd", rank=16)
    lorasum.similarity(["a", "b", "c"], plot="plots/")

(``lorasum.compose`` and ``lorasum.similarity`` are these functions; their modules are
``sys.modules["lorasum.compose"]`` etc., imported as ``from lorasum.compose import …``.)
"""

from lorasum.errors import LorasumError

__version__ = "0.1.0"

# after __version__: these modules import it
from lorasum.compose import compose  # noqa: E402
from lorasum.methods import MergeConfig, method_names  # noqa: E402
from lorasum.similarity import similarity  # noqa: E402

__all__ = ["LorasumError", "MergeConfig", "__version__", "compose", "method_names", "similarity"]
