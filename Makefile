# One-command entry points. `make test` and `make bench` create the virtual environment on first use.
PYTHON ?= python3
VENV   ?= .venv
# CPU build of torch by default; on a CUDA machine pass e.g. TORCH=torch (or TORCH= to keep an installed torch).
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python
BENCH_ARGS ?=

.PHONY: setup test bench lint sanitize clean

$(VENV)/.installed: pyproject.toml setup.py $(wildcard csrc/include/fastsampler/*.h csrc/cpu/*.cpp)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(TORCH),$(PY) -m pip install -q $(TORCH))
	$(PY) -m pip install -q -e '.[test,triton,bench]'
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) -m fastsampler.bench $(BENCH_ARGS)

lint: setup
	$(PY) -m pip install -q ruff
	$(PY) -m ruff check src tests examples tools
	command -v clang-format >/dev/null && clang-format --dry-run --Werror csrc/include/fastsampler/*.h csrc/cpu/*.cpp || true

# the C++ backend's own tests, the hostile-input cases and the fuzz suite, under ASan + UBSan (Triton cases skipped)
SANITIZE_TESTS ?= tests/test_cpu_backend.py tests/test_cpu_hostile.py tests/test_hostile.py tests/test_fuzz.py -k "not triton"

sanitize: setup
	PYTHON=$(PY) tools/sanitize.sh $(SANITIZE_TESTS)

clean:
	rm -rf build dist src/*.egg-info src/fastsampler/*.so $(VENV)
