"""Quiet the libraries' own warnings and progress bars (the CLI and worker processes)."""

from __future__ import annotations


def quiet_libraries() -> None:
    import warnings

    warnings.filterwarnings("ignore", module="peft")
    warnings.filterwarnings("ignore", module="transformers")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
