# Two commands do all the set-up on a fresh machine:
#   make quickstart   creates .venv, installs rhn, trains the offline quickstart
#   make test         same set-up, then runs the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned to the CPU wheel on the local disk; an unpinned torch would pull a
# multi-GB CUDA build. Sacred 0.8.7 needs pkg_resources, gone in setuptools 82.
TORCH ?= torch==2.13.0

.PHONY: quickstart test lint format clean install bench bench-quick bench-data

install: $(VENV)/.installed $(VENV)/.kernels

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/python -m pip install --quiet "$(TORCH)" "setuptools<82"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

# The native kernels, built at set-up (about a minute) so that no run waits for them.
# Where they cannot be built (no compiler) it says so, runs use the Python loop, and the
# set-up goes on; the next make tries again.
$(VENV)/.kernels: $(VENV)/.installed $(wildcard rhn_cli/kernels/csrc/*)
	@if $(BIN)/rhn kernels build; then touch $@; fi

quickstart: install
	$(BIN)/rhn train --name quickstart

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

# The performance suite (benchmarks/suite.py): one process, a table of tokens/s, peak
# memory, roofline fraction and start-up times, then the targets as PASS/MISS.
bench: install
	$(BIN)/python benchmarks/suite.py

bench-quick: install
	$(BIN)/python benchmarks/suite.py --quick

# Preparing a generated 100 MB enwik8-like file through the data pipeline.
bench-data: install
	$(BIN)/python benchmarks/prepare_enwik8.py

# Zaremba et al.'s small LSTM on the real PTB (docs/reproductions.md): fetches PTB
# (PTB_FROM: a local copy, else the published URL), trains ptb_lstm_small's 13 epochs
# (hours on 2 CPU cores) into RUNS_DIR, prints valid/test perplexity beside the
# published figures, ends PASS (test perplexity <= 116, exit 0) or MISS (exit 1). Not
# part of `make test`. ARGS go to rhn train: ARGS="max_max_epoch=1 max_time=30s" smokes.
.PHONY: reproduce-small
PTB_FROM ?=
RUNS_DIR ?= runs
reproduce-small: install
	$(BIN)/python benchmarks/reproduce_small.py --runs-dir "$(RUNS_DIR)" \
		$(if $(PTB_FROM),--ptb-from "$(PTB_FROM)") $(ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
