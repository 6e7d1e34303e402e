# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# Both create (once) and reuse a virtual environment in .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fsgeom-installed
export FSGEOM_DATA ?= $(if $(wildcard ../shared/data),$(abspath ../shared/data),)

.PHONY: venv demo test test-all lint format bench bench-deps clean

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

# Peer libraries for the benchmarks. backpack-for-pytorch requires torchvision, which would
# replace the CPU torch with a multi-GB CUDA build: install them without dependencies.
bench-deps: $(STAMP)
	$(PY) -m pip install -q --no-deps backpack-for-pytorch==1.7.1 curvlinops-for-pytorch==3.0.1 unfoldNd==0.2.3 einconv==0.1.0
	$(PY) -m pip install -q einops opt-einsum linear_operator==0.6.1
	$(PY) -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"

bench: bench-deps
	$(PY) analyses/bench_curvature.py
	$(PY) analyses/bench_optim.py
	$(PY) analyses/bench_tracking.py

clean:
	rm -rf $(VENV) outputs .pytest_cache
