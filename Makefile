# The two set-up commands: `make demo` (the main job) and `make test` (the suite). Both create or
# reuse .venv and install what they need; torch is pinned so that pip takes the local CPU build
# instead of pulling several GB of CUDA packages.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0

.PHONY: install demo test
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "torch==$(TORCH_VERSION)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

demo: install
	$(BIN)/python scripts/demo.py

test: install
	$(BIN)/ruff check src tests scripts benchmarks
	$(BIN)/python -m pytest
