#!/usr/bin/env bash
# Kernel correctness and benchmarks on an accelerator machine, run from a source tree (no install):
#   OUT=/some/dir bash bench/run_gpu.sh        (PYTHON=... to pick the interpreter)
# Writes one log (run.log) and the JSON results into $OUT (default bench/results). Each step runs
# even if one before it failed; the exit status is the accelerator correctness check's. The step
# timeouts add up to under ten minutes (140 + 100 + 90 + 180 + 30 + 50 = 590 s).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
OUT="${OUT:-bench/results}"
mkdir -p "$OUT"
LOG="$OUT/run.log"
: > "$LOG"
step() { echo -e "\n### $*" | tee -a "$LOG"; }

step "devices"
"$PY" -c "import jax; print(jax.__version__, jax.devices())" 2>&1 | tee -a "$LOG"

step "1. every native backend against the reference, forward and gradients, at realistic sizes"
timeout 140 "$PY" bench/gpu_checks.py --out "$OUT" 2>&1 | tee -a "$LOG"
checks=${PIPESTATUS[0]}

step "2. every backend interpreted on this machine's CPU (this jax version's Pallas APIs)"
JAX_PLATFORMS=cpu timeout 100 "$PY" bench/gpu_checks.py --out "$OUT" 2>&1 | tail -3 | tee -a "$LOG"

step "3. the Triton attention tests, compiled rather than interpreted (when pytest is present)"
if "$PY" -c "import pytest" 2>/dev/null; then
  timeout 90 "$PY" -m pytest -q -p no:cacheprovider -o addopts="" tests/test_attention_triton.py 2>&1 | tail -5 | tee -a "$LOG"
else
  echo "pytest not installed: skipped" | tee -a "$LOG"
fi

step "4. speed against XLA, cuDNN and jax's shipped Pallas ops"
timeout 180 "$PY" bench/kernels.py --out "$OUT" 2>&1 | tee -a "$LOG"

step "5. compiled memory of the fused loss against the unfused one"
timeout 30 "$PY" bench/loss_memory.py 2>&1 | tee -a "$LOG"
cp bench/results/loss_memory-*.json "$OUT/" 2>/dev/null || true

# bench/collectives.py's all-reduce algorithms need several devices: on one GPU they would time
# the identity, so this step measures what decides overlap on a GPU instead, XLA's flags.
step "6. an FSDP train step with and without XLA's latency-hiding scheduler (and pipelined collectives)"
timeout 50 "$PY" bench/overlap_flags.py --out "$OUT" --budget-s 45 2>&1 | tee -a "$LOG"
exit "$checks"
