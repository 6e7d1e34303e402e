# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# Both create (once) and reuse a virtual environment in .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fsgeom-installed
export FSGEOM_DATA ?= $(if $(wildcard ../shared/data),$(abspath ../shared/data),)

.PHONY: venv demo test test-all lint format bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fsgeom demo

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m ''

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: $(STAMP)
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) analyses/bench_curvature.py

clean:
	rm -rf $(VENV) outputs .pytest_cache
