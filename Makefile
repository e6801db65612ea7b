# deltakd: everything runs inside a virtual environment the Makefile makes itself.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU build of torch; GPU boxes: `make install TORCH_SPEC=torch` (or pre-install your CUDA torch).
TORCH_SPEC ?= torch==2.13.0

.PHONY: install test lint format bench demo pipeline clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,gguf]"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest tests

lint: install
	$(VENV)/bin/ruff check deltakd_cli tests
	$(VENV)/bin/ruff format --check deltakd_cli tests

format: install
	$(VENV)/bin/ruff format deltakd_cli tests
	$(VENV)/bin/ruff check --fix deltakd_cli tests

bench: install
	$(PY) tests/bench/run_all.py

clean:
	rm -rf $(VENV) runs .pytest_cache
