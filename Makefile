# Two entry points (see README): `make smoke` runs the main job, `make test` runs the tests.
# Both create .venv and install the project into it first, so they work on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: install smoke test test-min bench wheelhouse clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch/torchvision are named first so pip takes the CPU-capable wheels the machine already has
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "torch>=2.4,<=2.14.1" "torchvision>=0.19,<=0.29.1"
	$(BIN)/pip install -q -e ".[dev,ray]"
	$(BIN)/python -m pab_build.text.wordnet || echo "WordNet not installed (no apt-get?): the subject filter uses its lexicon file only"  # from Debian's wordnet-base
	touch $@

install: $(VENV)/.installed

smoke: install
	$(BIN)/pab run smoke --out out/smoke

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The dependency floors: constraints/minimum.txt (pyproject's floors, pinned) in a second venv that
# sees the main one's packages underneath (torch and the other heavy wheels are not re-downloaded),
# then the quick tests that load models, parse configs, write shards and run the subject filter.
MIN_VENV ?= .venv-min
MIN_TESTS ?= tests/test_config.py tests/test_units.py tests/test_manifests.py tests/test_subjects.py \
	tests/test_vlm.py tests/test_generate.py tests/test_shards.py tests/test_cmp_model.py
test-min: install
	test -x $(MIN_VENV)/bin/python || $(PYTHON) -m venv $(MIN_VENV)
	$(BIN)/python -c "import site; print(site.getsitepackages()[0])" \
		> $$($(MIN_VENV)/bin/python -c "import site; print(site.getsitepackages()[0])")/main_venv.pth
	$(MIN_VENV)/bin/pip install -q -r constraints/minimum.txt -r constraints/minimum-transitive.txt
	$(MIN_VENV)/bin/python -m pytest -q -p no:cacheprovider -m "not slow" -k "not datasets" $(MIN_TESTS)

bench: install
	$(BIN)/python bench/run_all.py

# wheels an air-gapped GPU machine (Python $(PYTHON_VERSION), bench/target-base.txt) lacks -> wheelhouse/;
# needs only the venv's current pip, not the install. WHEELHOUSE_ARGS=--bench-only: gpu.sh's part only
PYTHON_VERSION ?= 3.12
wheelhouse: | $(BIN)/python
	$(BIN)/python bench/wheelhouse.py --python-version $(PYTHON_VERSION) --dest wheelhouse $(WHEELHOUSE_ARGS)

clean:
	rm -rf out .pytest_cache
