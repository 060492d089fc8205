# Two entry points (see README): `make smoke` runs the main job, `make test` runs the tests.
# Both create .venv and install the project into it first, so they work on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: install smoke test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch/torchvision are named first so pip takes the CPU-capable wheels the machine already has
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "torch>=2.4,<=2.14.1" "torchvision>=0.19,<=0.29.1"
	$(BIN)/pip install -q -e ".[dev,ray]"
	$(BIN)/python -m pab_build.wordnet  # the subject filter's WordNet, from Debian's wordnet-base
	touch $@

install: $(VENV)/.installed

smoke: install
	$(BIN)/pab run smoke --out out/smoke

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: install
	$(BIN)/python bench/run_all.py

clean:
	rm -rf out .pytest_cache
