#!/usr/bin/env bash
# The GPU run of issue 13: CUDA tests, then the GPU tables, in at most about 8 minutes.
#
#     benchmarks/gpu.sh [OUT_DIR]      # default: $OUT if set, else benchmarks/results
#
# Writes OUT_DIR/gpu-<UTC date>.md (GPU name and date in its header): the CUDA tests' summary,
# Ghost BN / cuDNN BN with achieved bandwidth, precise_bn / forward (benchmarks/gpu_tables.py),
# and our SyncBatchNorm / torch.nn.SyncBatchNorm (benchmarks/bench_sync.py --device cuda).
# Without CUDA it is a dry run: one "skip:" line per CUDA step, exit 0, no file, no number.
# Exit status: non-zero when a step failed or ran out of its time (each step has a timeout).
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
DIR=${1:-${OUT:-benchmarks/results}}

if ! "$PY" -c 'import torch, rethinkbn'; then
    echo "gpu.sh: $PY cannot import torch and rethinkbn (activate the environment)" >&2
    exit 1
fi
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu.sh: no CUDA device: dry run, nothing measured"
    echo "skip: CUDA tests (python -m pytest -m cuda)"
    echo "skip: Ghost BN / torch BN (cuDNN) table with memory bandwidth (benchmarks/gpu_tables.py)"
    echo "skip: precise_bn / bare forward table (benchmarks/gpu_tables.py)"
    echo "skip: SyncBatchNorm / torch.nn.SyncBatchNorm table (benchmarks/bench_sync.py --device cuda)"
    exit 0
fi

mkdir -p "$DIR"
REPORT="$DIR/gpu-$(date -u +%Y%m%d-%H%M).md"
GPU=$("$PY" -c 'import torch; print(torch.cuda.get_device_name())')
status=0
{
    echo "# rethinkbn on $GPU, $(date -u '+%Y-%m-%d %H:%M') UTC"
    echo
    echo "Produced by benchmarks/gpu.sh at commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')."
    echo
} > "$REPORT"

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log, record failure
    local name=$1 limit=$2
    shift 2
    echo "== $name (at most ${limit} s)"
    local start=$SECONDS
    timeout "$limit" "$@"
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - start)) s"
    if [ "$rc" -ne 0 ]; then status=1; fi
    return 0
}

step "CUDA tests" 200 bash -c "\"$PY\" -m pytest -m cuda -q -p no:cacheprovider tests 2>&1 | tee \"$DIR/pytest-cuda.log\"; exit \${PIPESTATUS[0]}"
{
    echo "## CUDA tests (python -m pytest -m cuda)"
    echo
    echo '```'
    tail -n 15 "$DIR/pytest-cuda.log" 2>/dev/null
    echo '```'
    echo
} >> "$REPORT"
step "GPU tables" 180 "$PY" benchmarks/gpu_tables.py --out "$REPORT"
echo "## SyncBatchNorm (benchmarks/bench_sync.py --device cuda)" >> "$REPORT"
echo >> "$REPORT"
step "SyncBatchNorm" 90 bash -c "\"$PY\" benchmarks/bench_sync.py --device cuda | tee -a \"$REPORT\"; exit \${PIPESTATUS[0]}"
echo "gpu.sh: wrote $REPORT (exit $status)"
exit $status
