# Two commands set everything up on a fresh machine:
#   make demo   creates .venv, installs gemma4-nb, runs the demo
#   make test   creates .venv, installs gemma4-nb with test extras (and Debian's chromium for the
#               browser test), runs the sidebar's unit tests and every Python test
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch lies on this machine's disk; any other version pulls GBs of CUDA wheels.
TORCH ?= torch==2.13.0
PIP := $(BIN)/python -m pip --disable-pip-version-check
NPM ?= npm
# The venv's bin first: the extension build calls `jupyter labextension build` and `python`.
VENV_PATH = PATH="$(abspath $(BIN)):$$PATH"
# Installing Debian's chromium for the browser test needs root (sudo when not root).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# The JupyterLab sidebar (labextension/, TypeScript) is prebuilt into the package (and so into the
# wheel, as shared data) before the package is installed: users never run npm. The npm packages come
# from labextension/package-lock.json (`npm ci`); the build needs jupyterlab in the venv.
LABEXT := gemma4_nb/labextension/package.json
LABEXT_SRC := $(wildcard labextension/src/*.ts labextension/style/*) labextension/tsconfig.json

# llama.cpp (tests and `make bench`) is built for portable AVX2, not -march=native: a native build
# compiles in its AMX kernels, which crash on this machine's VM, and would not run on an older CPU.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON

.PHONY: demo test bench install install-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Build requirements first: installs use --no-build-isolation.
$(VENV)/.build-deps: | $(BIN)/python
	$(PIP) install --quiet hatchling "hatch-jupyter-builder>=0.9" "jupyterlab>=4.2,<5"
	touch $@

labextension/node_modules/.package-lock.json: labextension/package.json labextension/package-lock.json
	cd labextension && $(NPM) ci --no-audit --no-fund --loglevel=error
	touch $@

$(LABEXT): labextension/node_modules/.package-lock.json $(LABEXT_SRC) $(VENV)/.build-deps
	cd labextension && $(VENV_PATH) $(NPM) run --silent build:prod

$(VENV)/.deps: pyproject.toml $(LABEXT) $(VENV)/.build-deps
	$(PIP) install --quiet "$(TORCH)" hatchling
	$(VENV_PATH) $(PIP) install --quiet --no-build-isolation .
	touch $@

# llama.cpp's server is a test dependency (the remote-backend tests run against it on loopback);
# it compiles from source with the flags above (--no-cache-dir: never a wheel cached from a
# build with other flags).
$(VENV)/.deps-test: pyproject.toml $(VENV)/.deps
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP) install --quiet --no-cache-dir "llama-cpp-python[server]==0.3.36"
	$(VENV_PATH) $(PIP) install --quiet --no-build-isolation ".[test]"
	touch $@

# The browser test drives Debian's chromium with Playwright (Playwright's own browser downloads
# are not used; the test extras install the playwright package).
$(VENV)/.deps-browser: | $(BIN)/python
	@[ -x /usr/bin/chromium ] || { $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends chromium >/dev/null; }
	touch $@

# llama.cpp's own GGUF converter (convert_hf_to_gguf.py and its gguf-py), from the sdist of the
# llama-cpp-python the tests install: the GGUF tests convert tiny transformers checkpoints with it.
LLAMA_SDIST := llama_cpp_python-0.3.36
LLAMA_SRC := build/$(LLAMA_SDIST)/vendor/llama.cpp
$(LLAMA_SRC)/convert_hf_to_gguf.py: | $(BIN)/python
	mkdir -p build
	$(PIP) download --quiet --no-deps --no-binary :all: "llama-cpp-python==0.3.36" -d build/
	tar -xzf build/$(LLAMA_SDIST).tar.gz -C build/
	touch $@

# The package itself is reinstalled (non-editable, a few seconds) so tests run what users install.
install: $(VENV)/.deps $(LABEXT)
	$(VENV_PATH) $(PIP) install --quiet --no-deps --no-build-isolation --force-reinstall .

install-test: $(VENV)/.deps-test $(VENV)/.deps-browser $(LLAMA_SRC)/convert_hf_to_gguf.py install


demo: install
	$(BIN)/python -m gemma4_nb.devtools.demo examples/quickstart.ipynb build

# The sidebar's unit tests (vitest), then every Python test, the browser end-to-end test among them
# (its screenshots land in build/e2e/); the 30 slowest tests are listed at the end.
test: install-test
	cd labextension && $(NPM) test --silent
	cd tests && ../$(BIN)/python -m pytest -q -p no:cacheprovider --rootdir=.. --durations=30 ..

$(VENV)/.deps-bench: $(VENV)/.deps
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP) install --quiet --no-cache-dir "llama-cpp-python[server]==0.3.36"
	touch $@

# Benchmarks (not part of CI): load times of the embedded model, agreement and speed vs llama.cpp.
bench: install $(VENV)/.deps-bench
	$(BIN)/python -m gemma4_nb.bench --load-time
	$(BIN)/python -m gemma4_nb.bench --agreement llama.cpp --threads 2

clean:
	rm -rf $(VENV) build dist labextension/node_modules labextension/lib labextension/tsconfig.tsbuildinfo gemma4_nb/labextension
