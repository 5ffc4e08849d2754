# Two commands set everything up on a fresh machine:
#   make demo   creates .venv, installs gemma4-nb, runs the demo
#   make test   creates .venv, installs gemma4-nb with test extras, runs every test
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch lies on this machine's disk; any other version pulls GBs of CUDA wheels.
TORCH ?= torch==2.13.0
PIP := $(BIN)/python -m pip --disable-pip-version-check

# llama.cpp (tests and `make bench`) is built for portable AVX2, not -march=native: a native build
# compiles in its AMX kernels, which crash on this machine's VM, and would not run on an older CPU.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON

.PHONY: demo test bench install install-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.deps: pyproject.toml | $(BIN)/python
	$(PIP) install --quiet "$(TORCH)" hatchling
	$(PIP) install --quiet --no-build-isolation .
	touch $@

# llama.cpp's server is a test dependency (the remote-backend tests run against it on loopback);
# it compiles from source with the flags above (--no-cache-dir: never a wheel cached from a
# build with other flags).
$(VENV)/.deps-test: pyproject.toml $(VENV)/.deps
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP) install --quiet --no-cache-dir "llama-cpp-python[server]==0.3.36"
	$(PIP) install --quiet --no-build-isolation ".[test]"
	touch $@

# The package itself is reinstalled (non-editable, a few seconds) so tests run what users install.
install: $(VENV)/.deps
	$(PIP) install --quiet --no-deps --no-build-isolation --force-reinstall .

install-test: $(VENV)/.deps-test install

demo: install
	$(BIN)/python -m gemma4_nb.demo examples/quickstart.ipynb build

test: install-test
	cd tests && ../$(BIN)/python -m pytest -q -p no:cacheprovider --rootdir=.. ..

$(VENV)/.deps-bench: $(VENV)/.deps
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP) install --quiet --no-cache-dir "llama-cpp-python[server]==0.3.36"
	touch $@

# Benchmarks (not part of CI): load times of the embedded model, agreement and speed vs llama.cpp.
bench: install $(VENV)/.deps-bench
	$(BIN)/python -m gemma4_nb.bench --load-time
	$(BIN)/python -m gemma4_nb.bench --agreement llama.cpp --threads 2

clean:
	rm -rf $(VENV) build dist
