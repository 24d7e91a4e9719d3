#!/usr/bin/env bash
# GPU check for a lent CUDA machine (Python 3.12, torch and triton preinstalled, no internet), in one command:
#   1. environment report;  2. offline install of this checkout;  3. the test suite on the GPU (time-limited);
#   4. the benchmark (time-limited, ~4 minutes), then score / verify timings (bench.engine_ops, 1 minute at most);
#   5. stage results, then the benchmark summary, printed last.
# Each stage's failure is reported and the later stages still run. Everything lands in $OUT (default ./gpu_check_out):
#   setup.log tests.log bench.log engine_ops.log results.csv table.txt summary.txt summary.md latency_vs_batch.png
#
# Usage:  bash tools/gpu_check.sh
# Knobs (environment):
#   PYTHON=python3        interpreter that holds torch
#   TEST_TIMEOUT=150      seconds for the test stage (0 or SKIP_TESTS=1: skip it)
#   TEST_ARGS=...         pytest selection (default: -m "not slow" tests)
#   BENCH_BUDGET=210      the benchmark starts no new case after this many seconds (the rest: "skipped")
#   BENCH_TIMEOUT=300     hard limit of the benchmark stage (results written so far survive a kill)
#   BENCH_ARGS=...        extra arguments for python -m fastsampler.bench (e.g. "--scenarios plain,full")
#   ENGINE_TIMEOUT=60     hard limit of the engine_ops stage
# pybind11 (build requirement of the C++ CPU extension) ships in the GPU image; where it does not, put a pybind11
# wheel in wheels/ (git-ignored: `pip download pybind11 -d wheels --no-deps` on a machine with network) and carry
# that folder: it is installed from there with --no-index. If the build still fails, the pure-Python package is used
# from src/ (PYTHONPATH), which is all the Triton backend needs.
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
ROOT=$PWD
OUTDIR=${OUT:-$ROOT/gpu_check_out}
mkdir -p "$OUTDIR"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
SETUP_LOG=$OUTDIR/setup.log
TEST_LOG=$OUTDIR/tests.log
BENCH_LOG=$OUTDIR/bench.log
: >"$SETUP_LOG"
STAGES=()
T0=$(date +%s)
record() { STAGES+=("$(printf '%-9s %s  (t=%ss)' "$1" "$2" "$(($(date +%s) - T0))")"); }

# 1. environment --------------------------------------------------------------------------------------------------
{
  echo "== $(date -u +%FT%TZ)  $(uname -srm)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv 2>&1 ||
    echo "nvidia-smi: not available"
  "$PY" - <<'PYEOF'
import sys
import torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, "| SMs", p.multi_processor_count, "| memory GiB", round(p.total_memory / 2**30, 1),
          "| L2 MiB", round(getattr(p, "L2_cache_size", 0) / 2**20, 1))
try:
    import triton
    print("triton", triton.__version__)
except Exception as e:  # noqa: BLE001
    print("triton: not importable:", e)
PYEOF
} >>"$SETUP_LOG" 2>&1
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
  record env "ok: $(grep -m1 '^device' "$SETUP_LOG" || echo 'CUDA device')"
else
  record env "WARNING: no CUDA device visible to torch; tests and benchmark run on the CPU"
fi

# 2. install (offline) ----------------------------------------------------------------------------------------------
if ! "$PY" -c "import pybind11" >/dev/null 2>&1; then
  if ls wheels/pybind11-*.whl >/dev/null 2>&1; then
    if "$PY" -m pip install --no-index --find-links wheels pybind11 >>"$SETUP_LOG" 2>&1; then
      record pybind11 "installed from wheels/"
    else
      record pybind11 "FAILED to install from wheels/ (see setup.log)"
    fi
  else
    record pybind11 "missing and no wheels/pybind11-*.whl: the C++ extension cannot build"
  fi
fi
echo "== pip install --no-build-isolation --no-deps -e ." >>"$SETUP_LOG"
if "$PY" -m pip install --no-index --no-build-isolation --no-deps -e . >>"$SETUP_LOG" 2>&1; then
  record install "ok (editable, C++ extension built)"
else
  record install "FAILED (see setup.log): using PYTHONPATH=src, C++ backend unavailable"
  export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
fi
if "$PY" -c "import fastsampler as f; print('fastsampler', f.__version__, 'backends:', f.available_backends())" \
    >>"$SETUP_LOG" 2>&1; then
  record import "$(tail -1 "$SETUP_LOG")"
else
  record import "FAILED: fastsampler does not import (see setup.log)"
fi

# 3. tests ------------------------------------------------------------------------------------------------------------
TEST_TIMEOUT=${TEST_TIMEOUT:-150}
if [ "${SKIP_TESTS:-0}" = 1 ] || [ "$TEST_TIMEOUT" = 0 ]; then
  record tests "skipped"
else
  # shellcheck disable=SC2086
  timeout -k 10 "$TEST_TIMEOUT" "$PY" -m pytest -q -p no:cacheprovider --maxfail=20 -rfE --durations=15 \
    ${TEST_ARGS:--m "not slow" tests} >"$TEST_LOG" 2>&1
  rc=$?
  last=$(grep -E '(passed|failed|error|no tests ran)' "$TEST_LOG" | tail -1)
  case $rc in
    0) record tests "passed: $last" ;;
    124 | 137) record tests "TIMED OUT after ${TEST_TIMEOUT}s: ${last:-no summary} (see tests.log)" ;;
    *) record tests "FAILED (rc=$rc): ${last:-no summary} (see tests.log)" ;;
  esac
fi

# 4. benchmark --------------------------------------------------------------------------------------------------------
BENCH_BUDGET=${BENCH_BUDGET:-210}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-300}
# shellcheck disable=SC2086
timeout -k 10 "$BENCH_TIMEOUT" "$PY" -m fastsampler.bench --out "$OUTDIR" --budget-s "$BENCH_BUDGET" \
  --dtypes bf16,fp32 --time-per-measurement 0.15 ${BENCH_ARGS:-} >"$BENCH_LOG" 2>&1
rc=$?
case $rc in
  0) record bench "ok: $(tail -1 "$BENCH_LOG")" ;;
  124 | 137) record bench "TIMED OUT after ${BENCH_TIMEOUT}s (rows measured so far are in results.csv)" ;;
  *) record bench "FAILED (rc=$rc): $(tail -1 "$BENCH_LOG")" ;;
esac

# 4b. engine operations: score and speculative verification against their baselines (short, time-limited) -----------
ENGINE_LOG=$OUTDIR/engine_ops.log
timeout -k 10 "${ENGINE_TIMEOUT:-60}" "$PY" -m fastsampler.bench.engine_ops --vocab 128256 --tokens 2048 --batch 64 \
  --reps 10 >"$ENGINE_LOG" 2>&1
erc=$?
case $erc in
  0) record engine_ops "ok (engine_ops.log)" ;;
  124 | 137) record engine_ops "TIMED OUT after ${ENGINE_TIMEOUT:-60}s (engine_ops.log)" ;;
  *) record engine_ops "FAILED (rc=$erc): $(tail -1 "$ENGINE_LOG")" ;;
esac

# 5. report: stages, failing tests, then the summary last ------------------------------------------------------------
echo
echo "== gpu_check stages (logs in $OUTDIR)"
printf '%s\n' "${STAGES[@]}"
if [ -s "$TEST_LOG" ] && grep -qE '^(FAILED|ERROR) ' "$TEST_LOG"; then
  echo "== failing tests (first 15)"
  grep -E '^(FAILED|ERROR) ' "$TEST_LOG" | head -15 | cut -c1-200
fi
if [ $rc -ne 0 ] && [ -s "$BENCH_LOG" ]; then
  echo "== bench.log (last 15 lines)"
  tail -15 "$BENCH_LOG" | cut -c1-200
fi
if [ -s "$ENGINE_LOG" ]; then
  echo "== engine_ops"
  cut -c1-200 "$ENGINE_LOG" | tail -8
fi
echo
if [ -s "$OUTDIR/summary.txt" ]; then
  cat "$OUTDIR/summary.txt"
else
  echo "no benchmark summary was written"
fi
