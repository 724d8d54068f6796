# Quillan: `make pipeline` runs the whole pipeline (CPU default preset), `make test` the tests.
# Both create .venv and install the project into it when missing or when pyproject.toml changed.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
export PATH := $(CURDIR)/$(BIN):$(PATH)
export GX_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1

.PHONY: install pipeline test test-fast clean-outputs

$(BIN)/.installed: pyproject.toml quillan/kernels/ternary.cpp
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -e ".[dev]"
	$(BIN)/python -m quillan.kernels  # the native ternary kernels (C++, ~3 s)
	touch $@

install: $(BIN)/.installed

pipeline: install
	$(BIN)/quillan run

# One worker per core; the tests that read the smoke runs share a worker (tests/conftest.py).
PYTEST := $(BIN)/python -m pytest -q -n auto --dist loadgroup

test: install
	$(PYTEST)

test-fast: install
	$(PYTEST) -m "not slow"
