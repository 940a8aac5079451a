# HEAN developer commands. `make run` starts the system, `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
LIBS := $(sort $(wildcard libs/*/pyproject.toml))
SERVICES := $(sort $(wildcard services/*/pyproject.toml))
EDITABLES := $(foreach p,$(LIBS) $(SERVICES),-e $(dir $(p))) -e .[dev]

.PHONY: install run run-demo test test-unit test-integration lint typecheck check bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(LIBS) $(SERVICES)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(EDITABLES)
	touch $@

run: install
	$(BIN)/hean up $(ARGS)

run-demo: install
	$(BIN)/python -m hean.core.devrun

test: install
	$(BIN)/pytest -q -p no:cacheprovider

test-unit: install
	$(BIN)/pytest -q tests/unit

test-integration: install
	$(BIN)/pytest -q tests/integration

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy libs services tests bench examples

check: lint typecheck test

bench: install
	$(BIN)/python bench/bus.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
