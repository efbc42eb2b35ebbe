# `make test` and `make demo` build their own virtual environment in .venv.
# torch 2.13.0 is pinned because our CI machines hold its CPU build on local disk; from PyPI on
# Linux x86-64 the same pin resolves to a CUDA build of several GB. For the CPU wheel elsewhere:
#   make test TORCH_INDEX="--index-url https://download.pytorch.org/whl/cpu"
# Any Python >= 3.9 and torch >= 2.4 work (see pyproject.toml; torch 2.13 needs Python >= 3.10);
# the oldest:   make clean && make test PYTHON=python3.9 TORCH=torch==2.4.1
PYTHON      ?= python3
VENV        := .venv
PY          := $(VENV)/bin/python
TORCH       ?= torch==2.13.0
TORCH_INDEX ?=

.PHONY: venv test-venv test demo demo-sod demo-det demo-methods clean

# The environment in three steps, each redone only when needed: Python and torch; the package
# (what the demo needs); the test extras (pytest, the reference metrics, triton on Linux).
$(VENV)/.torch: Makefile
	@if [ "$(TORCH)" = "torch==2.13.0" ] && \
	    ! $(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then \
	    echo "error: the default torch==2.13.0 needs Python >= 3.10, and $(PYTHON) is older:" \
	         "pass PYTHON=python3.10 (or newer), or TORCH=torch==2.8.0"; exit 1; fi
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" $(TORCH_INDEX)
	touch $@

$(VENV)/.installed: $(VENV)/.torch pyproject.toml
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[test]"
	touch $@

venv: $(VENV)/.installed
test-venv: $(VENV)/.installed-test

# One test process per core (at most 4), one thread each; each test file runs in one process,
# so a module's shared fixture is computed once.
test: test-venv
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

# The environment and the demos' outputs; training runs elsewhere under runs/ are kept.
clean:
	rm -rf $(VENV) .pytest_cache runs/demo runs/demo_methods
