# gpt2_jax: `make install`, then `make test` / `make train SIZE=tiny|small|medium|large|xl`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build of torch for the parity tests (a bare `torch` requirement pulls a multi-GB CUDA build).
TORCH_SPEC ?= torch==2.13.0
# Where data sets are read from when offline (TFDS manual directory); ../shared/data beside the
# checkout holds the corpora used by CI.
export GPT2_JAX_DATA_DIR ?= $(abspath ../shared/data)
PYTEST_ARGS ?=

.PHONY: install test test-slow help

help:
	@echo "make install   create $(VENV) and install gpt2_jax with its test dependencies"
	@echo "make test      run the test suite (under 15 minutes on 2 CPU cores)"
	@echo "make test-slow run the end-to-end tests marked slow (CI runs both)"

install:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -e ".[test]"

test:
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# pytest exits 5 when no test carries the mark: not a failure.
test-slow:
	$(PY) -m pytest -m slow $(PYTEST_ARGS) || [ $$? -eq 5 ]
