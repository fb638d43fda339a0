# revdial developer entry points.
#
#   make demo   set up .venv and run the loopback demo (no config needed)
#   make test   set up .venv, then ruff, mypy --strict, pytest and a short fuzz run
#
# Every recipe line runs under bash with -e -u -o pipefail, so any failing
# step makes the whole target (and `make test`) fail with a non-zero status.

PYTHON ?= python3
VENV = .venv
BIN = $(VENV)/bin
STAMP = $(VENV)/.installed

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

# Never prompt (CI has no stdin) and keep pip's output short.
export PIP_NO_INPUT := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: help venv lint typecheck pytest fuzz test demo bench clean

help:
	@echo "make demo       set up $(VENV) and run 'revdial demo' on loopback"
	@echo "make test       lint + typecheck + pytest + fuzz (what CI runs)"
	@echo "make venv       create/refresh $(VENV) with '.[test]' installed"
	@echo "make lint       ruff check"
	@echo "make typecheck  mypy --strict (config in pyproject.toml)"
	@echo "make pytest     run the test suite"
	@echo "make fuzz       every fuzz campaign, sharing SECONDS (default 40)"
	@echo "make bench      run the benchmarks"
	@echo "make clean      remove $(VENV), caches and build output"

# The stamp is the only real file target: it is rebuilt when pyproject.toml
# changes (new dependency, new extra, ...).
$(STAMP): pyproject.toml
	@echo "==> setting up $(VENV) with $(PYTHON)"
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' || { \
	  echo "error: revdial needs Python >= 3.11; '$(PYTHON)' is $$($(PYTHON) -V 2>&1)." >&2; \
	  echo "       run e.g. 'make PYTHON=python3.12 ...'" >&2; exit 1; }
	@$(PYTHON) -m venv $(VENV) || { \
	  echo "error: '$(PYTHON) -m venv' failed; on Debian/Ubuntu install python3-venv." >&2; exit 1; }
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $@

venv: $(STAMP)

lint: $(STAMP)
	@echo "==> ruff check"
	$(BIN)/ruff check src tests fuzz benchmarks

typecheck: $(STAMP)
	@echo "==> mypy --strict"
	$(BIN)/mypy

# pytest exit code 5 ("no tests collected") is deliberately NOT masked.
pytest: $(STAMP)
	@echo "==> pytest"
	$(BIN)/python -m pytest -q -p no:cacheprovider --timeout=120

# Every campaign in fuzz/ shares SECONDS (make test runs 40 s in all; a long
# campaign: make fuzz SECONDS=3600).
SECONDS ?= 40
fuzz: $(STAMP)
	@echo "==> fuzz (frames, state, proxy, cli: $(SECONDS) s in all)"
	$(BIN)/python -m fuzz --seconds $(SECONDS)

# Sequential on purpose (prerequisites of a phony target could run in
# parallel under -j); stops at the first failing step.
test: $(STAMP)
	@$(MAKE) --no-print-directory lint
	@$(MAKE) --no-print-directory typecheck
	@$(MAKE) --no-print-directory pytest
	@$(MAKE) --no-print-directory fuzz
	@echo "==> make test: all steps passed"

demo: $(STAMP)
	$(BIN)/revdial demo

bench: $(STAMP)
	@echo "==> benchmarks"
	$(BIN)/python -m benchmarks.run

clean:
	rm -rf $(VENV) build dist .mypy_cache .ruff_cache .pytest_cache .hypothesis
	find . -path ./.git -prune -o \( -name '__pycache__' -o -name '*.egg-info' \) -prune -exec rm -rf {} +
