# Two commands set everything up on a fresh machine:
#   make serve   install, then serve MODEL (a local folder or hub id) or, without MODEL, a tiny demo model
#   make test    install with the test tools, then run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PORT   ?= 8000
MODEL  ?=

.PHONY: serve test lint bench install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed-worker: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e ".[worker]"
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e ".[dev]"
	touch $@ $(VENV)/.installed-worker

install: $(VENV)/.installed-worker

serve: $(VENV)/.installed-worker
	$(BIN)/lmfleet serve --port $(PORT) $(if $(MODEL),--model-path $(MODEL),--demo)

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check lmfleet tests

clean:
	rm -rf $(VENV) .pytest_cache
