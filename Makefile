# The README's two commands: `make demo` and `make test`. Everything they need is installed here.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.edgekit-installed

.PHONY: demo test test-fast bench lint install native clean

# The ai.edgekit ONNX Runtime library (runtimes/onnxruntime/build.py; instant when up to date): a failed build
# warns and the ops fall back to the reference, except in CI (CI set), where it fails.
install: $(STAMP)
	$(PY) runtimes/onnxruntime/build.py --optional

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[build,agent,examples,sync,tflite,cloud,dev]'
	touch $(STAMP)

# Rebuild the native ONNX Runtime custom-op library (runtimes/onnxruntime/), failing loudly.
native: install
	$(PY) runtimes/onnxruntime/build.py

demo: install
	$(VENV)/bin/edgekit build --target cpu-x86 --out out

test: install lint
	$(PY) -m pytest -q -ra

test-fast: install
	$(PY) -m pytest -q -m "not e2e"

lint: install
	$(VENV)/bin/ruff check edgekit tests benchmarks examples
	$(VENV)/bin/lint-imports

bench: install
	$(PY) benchmarks/build_cpu.py

clean:
	rm -rf out build dist .pytest_cache
