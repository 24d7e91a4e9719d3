#!/usr/bin/env bash
# Build fastsampler.backends.cpu._C with AddressSanitizer + UndefinedBehaviorSanitizer and run the CPU backend tests against it.
#
# The sanitized extension goes into a private copy of the package (a temporary directory put first on PYTHONPATH),
# so the regular build in src/fastsampler is left untouched. Any ASan / UBSan report fails the run.
#
#   tools/sanitize.sh                      # tests/test_cpu_*.py
#   tools/sanitize.sh tests/test_cpu_backend.py -k exact   # extra pytest arguments
#   EXTRA_CXXFLAGS=-mno-avx512f tools/sanitize.sh          # the AVX2 path (on an AVX-512 machine)
#   EXTRA_CXXFLAGS=-DFASTSAMPLER_NO_SIMD tools/sanitize.sh  # the portable (no intrinsics) path
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python}"
CXX="${CXX:-g++}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/fastsampler-sanitize.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

cp -r src/fastsampler "$WORK/fastsampler"
rm -f "$WORK"/fastsampler/backends/cpu/_C*.so
EXT_SUFFIX="$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')"
PYINC="$("$PY" -m pybind11 --includes)"
OMP=""
if echo 'int main(){}' | "$CXX" -fopenmp -x c++ - -o "$WORK/omp_probe" 2>/dev/null; then OMP="-fopenmp"; fi
echo "building the sanitized extension ($CXX, -fsanitize=address,undefined $OMP)"
# shellcheck disable=SC2086
"$CXX" -std=c++17 -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=all \
  -march=native $OMP ${EXTRA_CXXFLAGS:-} -fPIC -shared -Icsrc/include $PYINC csrc/cpu/*.cpp -o "$WORK/fastsampler/backends/cpu/_C$EXT_SUFFIX"

# the interpreter is not instrumented: preload the runtimes; CPython's arenas look like leaks, so leak checking is off
PRELOAD="$("$CXX" -print-file-name=libasan.so):$("$CXX" -print-file-name=libubsan.so)"
ARGS=("$@")
if [ ${#ARGS[@]} -eq 0 ]; then ARGS=(tests/test_cpu_*.py); fi
echo "running: pytest ${ARGS[*]}"
env LD_PRELOAD="$PRELOAD" ASAN_OPTIONS="detect_leaks=0:alloc_dealloc_mismatch=0" PYTHONPATH="$WORK" \
  "$PY" -c "import fastsampler.backends.cpu._C as c, sys; f = c.__file__; print('extension under test:', f); \
sys.exit(0 if f.startswith('$WORK') else 'the sanitized extension was not picked up')"
env LD_PRELOAD="$PRELOAD" \
  ASAN_OPTIONS="detect_leaks=0:alloc_dealloc_mismatch=0:abort_on_error=1:halt_on_error=1" \
  UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1" \
  PYTHONPATH="$WORK${PYTHONPATH:+:$PYTHONPATH}" \
  FASTSAMPLER_SANITIZED=1 \
  "$PY" -m pytest -q -p no:cacheprovider "${ARGS[@]}"
echo "sanitizer run clean"
