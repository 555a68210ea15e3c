# Two entry points on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-test
BENCHSTAMP := $(VENV)/.installed-bench
DOCSTAMP := $(VENV)/.installed-docs
export OMP_NUM_THREADS ?= 2

.PHONY: demo test test-slow test-all lint bench examples docs wheel-check gpu-check clean _bench-extra $(BENCHES)

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

$(DOCSTAMP): $(STAMP)
	$(BIN)/pip install -q -c constraints.txt -e ".[test,docs]"
	touch $(DOCSTAMP)

demo: $(STAMP)
	$(BIN)/second compare --out-dir demo-output

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m "slow or not slow"

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples
	$(BIN)/mypy

# Each benchmark runs the anchors side by side in one process (bench extra); BENCHMARKS.md
# records the output of the full runs. One thread: the machines have 2 cores.
BENCHES := bench-products bench-solvers bench-conformance bench-kfac bench-newton bench-influence bench-implicit \
	bench-laplace bench-diagonal bench-zoo bench-scale
bench: $(BENCHES)

# BENCH_ARGS=--quick for a short run of bench-products / bench-solvers
bench-products: $(BENCHSTAMP)
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/bench_products.py $(BENCH_ARGS)

bench-solvers: $(BENCHSTAMP)
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/bench_solvers.py $(BENCH_ARGS)

bench-conformance: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/bench_conformance.py $(BENCH_ARGS)

bench-kfac: $(BENCHSTAMP)
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/bench_kfac.py

bench-newton: $(BENCHSTAMP)
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/bench_newton.py

bench-influence: $(BENCHSTAMP)
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/bench_influence.py

bench-implicit: $(BENCHSTAMP)
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/bench_implicit.py

bench-laplace: $(BENCHSTAMP)
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/bench_laplace.py --out bench-output

bench-diagonal: $(BENCHSTAMP)
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/bench_diagonal.py

# The zoo and the scale benchmarks have anchors whose pins conflict with `bench`: each gets its
# own virtual environment (.venv-zoo, .venv-scale) from its own extra
bench-zoo:
	$(MAKE) VENV=.venv-zoo EXTRA=bench-zoo SCRIPT=bench_zoo.py _bench-extra

bench-scale:
	$(MAKE) VENV=.venv-scale EXTRA=bench-scale SCRIPT=bench_scale.py _bench-extra

_bench-extra: $(STAMP)
	$(BIN)/pip install -q -c constraints.txt -e ".[test,$(EXTRA)]"
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/$(SCRIPT) $(BENCH_ARGS)

# The runnable examples (PNGs go to examples-output/)
examples: $(STAMP)
	mkdir -p examples-output
	OMP_NUM_THREADS=1 $(BIN)/python examples/influence_digits.py --out examples-output/influence_digits.png
	OMP_NUM_THREADS=1 $(BIN)/python examples/hyperparameter_weight_decay.py --out examples-output/weight_decay.png
	OMP_NUM_THREADS=1 $(BIN)/python examples/imaml_sinusoid.py --quick --out examples-output/imaml.png
	OMP_NUM_THREADS=1 $(BIN)/python examples/kfac_autoencoder.py

# The documentation site (MkDocs Material + mkdocstrings) in site/: the gallery examples run
# first (quick settings, ~75 s), then a strict build (any warning fails)
docs: $(DOCSTAMP)
	OMP_NUM_THREADS=1 $(BIN)/python docs/gallery/run_examples.py
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --clean

# Build the wheel, install it into a fresh venv (torch from the local CPU wheel, the rest from
# PyPI or pip's cache; no extras) and run a smoke script from outside the source tree
WHEELVENV := build/wheel-venv
wheel-check: $(STAMP)
	rm -rf dist $(WHEELVENV)
	$(BIN)/python -m build --wheel --outdir dist .
	$(PY) -m venv $(WHEELVENV)
	$(WHEELVENV)/bin/pip install -q -c constraints.txt torch==2.13.0
	$(WHEELVENV)/bin/pip install -q -c constraints.txt dist/second-*.whl
	cd $(WHEELVENV) && bin/python $(CURDIR)/tests/packaging/smoke_wheel.py

# One short run on a CUDA device (HVP/GGN cost ratios, KFAC steps, influence scores against the
# CPU), figures printed; skips cleanly where there is no CUDA
gpu-check: $(STAMP)
	$(BIN)/python benchmarks/gpu_check.py

clean:
	rm -rf $(VENV) .venv-zoo .venv-scale demo-output examples-output bench-output .pytest_cache site docs/gallery/_generated dist build
