# latentdit: the command index. `make help` lists the targets.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.latentdit-setup

.PHONY: help setup test lint format bench bench-store

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 16

setup: $(STAMP)  ## create .venv with the CPU torch (override: make setup TORCH=torch) and the project

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

test: setup  ## run the whole fast test suite
	$(PY) -m pytest

lint: setup  ## ruff lint and format check
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: setup  ## apply ruff fixes and formatting
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

bench-store: setup  ## store write / load / random-batch throughput (JSON)
	$(PY) bench/bench_store.py

# --- encode ---


# --- train ---


# --- sample ---


# --- demo ---


bench: bench-store  ## every benchmark (JSON lines)
