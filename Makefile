# `make test` and `make demo` build their own virtual environment in .venv.
# torch 2.13.0 is pinned because our CI machines hold its CPU build on local disk; from PyPI on
# Linux x86-64 the same pin resolves to a CUDA build of several GB. For the CPU wheel elsewhere:
#   make test TORCH_INDEX="--index-url https://download.pytorch.org/whl/cpu"
# Any Python >= 3.9 and torch >= 2.4 work (see pyproject.toml); the oldest:
#   make clean && make test PYTHON=python3.9 TORCH=torch==2.4.1
PYTHON      ?= python3
VENV        := .venv
PY          := $(VENV)/bin/python
TORCH       ?= torch==2.13.0
TORCH_INDEX ?=

.PHONY: venv test demo demo-sod demo-det demo-methods clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" $(TORCH_INDEX)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

venv: $(VENV)/.installed

# One test process per core (at most 4), one thread each; each test file runs in one process,
# so a module's shared fixture is computed once.
test: venv
	OMP_NUM_THREADS=1 TRITON_INTERPRET=1 $(PY) -m pytest -q -n auto --maxprocesses 4 \
		--dist loadfile tests

demo: venv
	$(PY) -m ivt.demo --out runs/demo

demo-sod: venv
	$(PY) -m ivt.demo --task sod --out runs/demo

demo-det: venv
	$(PY) -m ivt.demo --task det --out runs/demo

demo-methods: venv
	$(PY) -m ivt.demo --methods --out runs/demo_methods

clean:
	rm -rf $(VENV) runs .pytest_cache
