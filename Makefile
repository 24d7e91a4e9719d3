# One-command entry points. `make test` and `make bench` create the virtual environment on first use.
PYTHON ?= python3
VENV   ?= .venv
# torch==2.13.0 (the version CI pins). Which build pip installs depends on the index: PyPI's Linux wheel is the CUDA
# build; pass the index for another, e.g. TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
# (README § Install), or TORCH= to keep an installed torch.
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python
BENCH_ARGS ?=
PYTEST_ARGS ?=
# pytest-xdist workers of `make test-all` (auto: one per core)
TEST_WORKERS ?= auto

.PHONY: setup test test-all bench lint sanitize wheel-smoke clean

$(VENV)/.installed: pyproject.toml setup.py $(wildcard csrc/include/fastsampler/*.h csrc/cpu/*.cpp)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(TORCH),$(PY) -m pip install -q $(TORCH))
	$(PY) -m pip install -q -e '.[test,triton,bench,lint,integrations]'
	touch $@

setup: $(VENV)/.installed

# the fast tier (a few minutes on two cores): everything not marked `slow` (the Triton interpreter's largest cases
# and the sm_90 compile of every launched kernel; see the markers in pyproject.toml)
test: setup
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# every test, the slow tier included (CI), over every core (pytest-xdist)
test-all: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) $(PYTEST_ARGS)

# the device's default grid (on the CPU a small one: 1-2 minutes on two cores); BENCH_ARGS=--full for the full grid
bench: setup
	$(PY) -m fastsampler.bench $(BENCH_ARGS)

# ruff and clang-format pinned by the `lint` extra (pyproject.toml), installed by `make setup`; either one failing,
# or missing, fails the target
lint: setup
	$(PY) -m ruff --version
	$(PY) -m ruff check src tests examples tools
	@test -x $(VENV)/bin/clang-format || { echo "clang-format is missing from $(VENV) (the lint extra): run make setup" >&2; exit 1; }
	$(VENV)/bin/clang-format --version
	$(VENV)/bin/clang-format --dry-run --Werror csrc/include/fastsampler/*.h csrc/cpu/*.cpp

# the C++ backend's own tests, its conformance cases, the hostile-input cases and the fuzz suite, under ASan + UBSan
# (Triton cases skipped)
SANITIZE_TESTS ?= tests/test_cpu_backend.py tests/test_conformance.py tests/test_cpu_hostile.py tests/test_hostile.py \
	tests/test_fuzz.py -k "not triton"

sanitize: setup
	PYTHON=$(PY) tools/sanitize.sh $(SANITIZE_TESTS)

# the wheel as users get it: `python -m build --wheel` (every SIMD variant: _C_avx512, _C_avx2, _C_portable), installed
# with torch into a fresh venv, then tools/wheel_smoke.py from outside the source tree (import, `_C.simd()`, a mixed
# batch against the reference, each FASTSAMPLER_SIMD this CPU runs). About a minute on two cores (62 s measured).
WHEEL_VENV ?= .wheel-venv
wheel-smoke: setup
	rm -rf build dist $(WHEEL_VENV)
	$(PY) -m build --wheel --outdir dist .
	$(PYTHON) -m venv $(WHEEL_VENV)
	$(WHEEL_VENV)/bin/python -m pip install -q $(TORCH) dist/fastsampler-*.whl
	cd $(WHEEL_VENV) && bin/python $(CURDIR)/tools/wheel_smoke.py

clean:
	rm -rf build dist src/*.egg-info src/fastsampler/backends/cpu/*.so $(VENV) $(WHEEL_VENV)
