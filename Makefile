# Two entry points from a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
OUT ?= results/demo

.PHONY: install demo test test-arviz1 test-slow lint bench bench-runner bench-estimators bench-step-time bench-hierarchical bench-distributed notebooks notebooks-full clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lvmkit demo --out $(OUT)

test: $(STAMP)
	$(PY) -m pytest -n 2 -q
	LVMKIT_FAST=1 OMP_NUM_THREADS=1 $(PY) -m pytest --nbmake -n 2 -q tutorials/

# The ArviZ-line-specific layer against ArviZ 1.x, which needs Python >= 3.12 (the project's
# venv runs 3.11 with ArviZ 0.23). It imports neither torch nor Pyro, so this venv is small.
AZ1_VENV ?= .venv-arviz1
PYTHON312 ?= python3.12
test-arviz1:
	@if ! PYENV_VERSION=3.12 $(PYTHON312) -c 'import sys; assert sys.version_info >= (3, 12)' 2>/dev/null; then \
		echo "test-arviz1: skipped, no Python >= 3.12 ($(PYTHON312))"; exit 0; fi; \
	test -x $(AZ1_VENV)/bin/python || PYENV_VERSION=3.12 $(PYTHON312) -m venv $(AZ1_VENV); \
	$(AZ1_VENV)/bin/pip install -q 'arviz>=1,<2' matplotlib pytest && \
	MPLBACKEND=Agg $(AZ1_VENV)/bin/python -m pytest --noconftest -p no:cacheprovider -q tests/test_arviz_convert.py

test-slow: $(STAMP)
	$(PY) -m pytest -n 2 -q -m slow

lint: $(STAMP)
	$(VENV)/bin/ruff check lvmkit tests benchmarks

# Benchmarks (see the README's table); each writes results/bench_*.json and .md.
bench: bench-runner bench-estimators bench-step-time bench-hierarchical bench-distributed

bench-runner: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) benchmarks/runner.py

# storchastic is a benchmark-only comparator, never a dependency of lvmkit.
bench-estimators: $(STAMP)
	$(PIP) install -q -c constraints.txt storchastic
	OMP_NUM_THREADS=1 $(PY) benchmarks/estimators.py

bench-step-time: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) benchmarks/step_time.py

bench-hierarchical: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) benchmarks/hierarchical.py

# 1 against 2 processes under torchrun (gloo on the CPU); --device cuda on a GPU machine.
bench-distributed: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) benchmarks/distributed.py

notebooks: $(STAMP)
	LVMKIT_FAST=1 OMP_NUM_THREADS=1 $(PY) -m pytest --nbmake -n 2 -q tutorials/

# Re-executes the tutorials in full mode and saves their outputs (commit the result).
notebooks-full: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest --nbmake --overwrite -n 0 -q tutorials/

clean:
	rm -rf $(VENV) results .pytest_cache
