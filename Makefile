# HEAN developer commands. `make run` starts the system, `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
LIBS := $(sort $(wildcard libs/*/pyproject.toml))
SERVICES := $(sort $(wildcard services/*/pyproject.toml))
EDITABLES := $(foreach p,$(LIBS) $(SERVICES),-e $(dir $(p))) -e .[dev]

COMPOSE ?= docker compose
COMPOSE_ARGS := -f deploy/docker-compose.yml --env-file .env

.PHONY: install run run-demo test test-unit test-integration test-reliability lint typecheck \
	check bench validate up up-full down clean

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

# Fault injection, bad input, access and soak on real processes (HEAN_CHAOS_LONG=1: long runs)
test-reliability: install
	$(BIN)/pytest -q -p no:cacheprovider tests/chaos

# Compose, Prometheus and Grafana files checked with real tools (no Docker engine needed)
validate: install
	bash deploy/validate.sh

# The Docker stack (needs a Docker engine; copy .env.example to .env and set the passwords)
up:
	$(COMPOSE) $(COMPOSE_ARGS) up -d --build

up-full:
	$(COMPOSE) $(COMPOSE_ARGS) --profile full up -d --build

down:
	$(COMPOSE) $(COMPOSE_ARGS) --profile full --profile kafka down

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
