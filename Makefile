# Two commands set everything up on a fresh machine:
#   make demo   creates .venv, installs gemma4-nb, runs the demo
#   make test   creates .venv, installs gemma4-nb with test extras, runs every test
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch lies on this machine's disk; any other version pulls GBs of CUDA wheels.
TORCH ?= torch==2.13.0
PIP := $(BIN)/python -m pip --disable-pip-version-check

.PHONY: demo test install install-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.deps: pyproject.toml | $(BIN)/python
	$(PIP) install --quiet "$(TORCH)" hatchling
	$(PIP) install --quiet --no-build-isolation .
	touch $@

$(VENV)/.deps-test: pyproject.toml $(VENV)/.deps
	$(PIP) install --quiet --no-build-isolation ".[test]"
	touch $@

# The package itself is reinstalled (non-editable, a few seconds) so tests run what users install.
install: $(VENV)/.deps
	$(PIP) install --quiet --no-deps --no-build-isolation --force-reinstall .

install-test: $(VENV)/.deps-test install

demo: install
	$(BIN)/python -m gemma4_nb.demo

test: install-test
	cd tests && ../$(BIN)/python -m pytest -q -p no:cacheprovider --rootdir=.. ..

clean:
	rm -rf $(VENV) build dist
