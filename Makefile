# pals: `make demo` runs the quickstart scenario, `make test` lints and runs the tests, `make bench` the benchmarks.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: setup demo test bench reproduce clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/pals compare scenarios/quickstart.yaml --policies static,pals --out runs/quickstart

test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

bench: setup
	$(PY) -m pytest benchmarks --benchmark-only --benchmark-columns=min,median,max,rounds -s 

reproduce: setup
	$(VENV)/bin/pals reproduce --out runs/reproduce

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache .benchmarks
