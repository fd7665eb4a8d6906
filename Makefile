# Two commands do all the set-up on a fresh machine:
#   make quickstart   creates .venv, installs rhn, trains the offline quickstart
#   make test         same set-up, then runs the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned to the CPU wheel on the local disk; an unpinned torch would pull a
# multi-GB CUDA build. Sacred 0.8.7 needs pkg_resources, gone in setuptools 82.
TORCH ?= torch==2.13.0

.PHONY: quickstart test lint format clean install bench

install: $(VENV)/.installed

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/python -m pip install --quiet "$(TORCH)" "setuptools<82"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

quickstart: install
	$(BIN)/rhn train --name quickstart

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

# Each script in benchmarks/ prints its own figures (wall time, peak memory);
# rhn_baseline.py is a module: the straightforward RHN the benchmarks compare against.
bench: install
	@for script in benchmarks/*.py; do \
		case $$script in benchmarks/rhn_baseline.py) continue;; esac; \
		echo "== $$script"; $(BIN)/python $$script || exit 1; \
	done

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
