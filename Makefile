# Two entry points on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-test
BENCHSTAMP := $(VENV)/.installed-bench
export OMP_NUM_THREADS ?= 2

.PHONY: demo test test-slow test-all lint bench bench-products bench-solvers clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

$(BENCHSTAMP): $(STAMP)
	$(BIN)/pip install -q -c constraints.txt -e ".[test,bench]"
	touch $(BENCHSTAMP)

demo: $(STAMP)
	$(BIN)/second compare --out-dir demo-output

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m "slow or not slow"

lint: $(STAMP)
	$(BIN)/ruff check src tests

bench: bench-products
	$(BIN)/python benchmarks/bench_solvers.py

# BENCH_ARGS=--quick for a short run (about a minute); the full run records BENCHMARKS.md's table
bench-products: $(BENCHSTAMP)
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/bench_products.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) demo-output .pytest_cache
