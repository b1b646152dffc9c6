# Two entry points for a fresh machine: `make repro` (install, then the whole DVC pipeline on the demo data)
# and `make test` (install, then the test suite). Both create .venv with Python 3.11 and exact pins.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install repro test lint clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "Installing the pinned environment into $(VENV) (about 2 minutes, mostly torch)..."
	$(BIN)/python -m pip install -qq -c constraints.txt -e ".[dev]"
	touch $(STAMP)

repro: install
	# dvc runs each stage's `python -m stages ...` through the shell: the venv's python must come first on PATH
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .

clean-venv:
	rm -rf $(VENV)
