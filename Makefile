# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test demo clean

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

# two workers (files kept together, so module fixtures are built once): most tests are bound by XLA's
# single-threaded compiles, which two workers overlap. The files go out slowest first, and the files that share
# compiled programs as one unit (tests/conftest.py: --no-loadscope-reorder keeps that order)
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder tests

demo: $(STAMP)
	$(PY) -m blip3o_jax.demo

clean:
	rm -rf $(VENV) build *.egg-info
