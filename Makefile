# pals: `make demo` runs the quickstart scenario, `make test` lints and runs the tests, `make bench` the benchmarks.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: setup demo test bench reproduce calibrate clean

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

# Refit traces/calibration/*.json from the measurements in ../shared/data (see README, Calibration).
SHARED_DATA ?= ../shared/data
calibrate: setup
	$(VENV)/bin/pals profile import pals-a100 $(SHARED_DATA)/pals_a100/moe_summary_tp4.csv --out runs/profiles/pals.csv
	$(VENV)/bin/pals profile import mlenergy $(SHARED_DATA)/mlenergy_v3 --out runs/profiles/mle.csv
	$(VENV)/bin/pals profile import argonne $(SHARED_DATA)/argonne/power_results.csv --out runs/profiles/arg.csv
	$(VENV)/bin/pals calibrate runs/profiles/pals.csv runs/profiles/arg.csv --gpu a100-sxm4-80gb \
		--applies-to a100-sxm4-40gb
	$(VENV)/bin/pals calibrate runs/profiles/mle.csv runs/profiles/arg.csv --gpu h100-sxm \
		--measured compute_efficiency=0.77
	$(VENV)/bin/pals calibrate runs/profiles/mle.csv --gpu b200

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache .benchmarks
