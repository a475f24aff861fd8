# One command sets up and runs each thing; the virtualenv is made once and reused.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)  ## the one-command tour: embedded Redis, sandbox, worker, intents, summary
	$(BIN)/tpns-batcher demo

lint: $(STAMP)  ## ruff, mypy --strict, and the layout's import contracts (pyproject [tool.importlinter])
	$(BIN)/ruff check worker tests
	$(BIN)/mypy
	$(BIN)/lint-imports

test: lint  ## lint, type-check, then the whole test suite
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/tpns-batcher bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .import_linter_cache .grimp_cache
