# `make train` and `make test` each set up everything they need on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/fmnist_sit.py
WORKDIR ?= runs/fmnist_sit
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist
PYTEST_ARGS ?=

.PHONY: train test test-fast venv dataset clean-venv

$(VENV)/.installed: requirements.txt requirements-nodeps.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements.txt
	$(VENV)/bin/pip install --quiet --no-deps -r requirements-nodeps.txt
	touch $@

venv: $(VENV)/.installed

# Fashion-MNIST comes from Debian's dataset-fashion-mnist package (IDX files, no download at
# run time). Installed here when we may; otherwise the exact command is printed.
dataset:
	@if [ -f "$(FMNIST_DIR)/train-images-idx3-ubyte.gz" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then \
	  echo "installing dataset-fashion-mnist (Debian package)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then \
	  sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	else \
	  echo "Fashion-MNIST is missing from $(FMNIST_DIR). Run:"; \
	  echo "  sudo apt-get install dataset-fashion-mnist"; \
	  echo "or point FMNIST_DIR (and --config.data.idx_dir) at a directory holding the IDX .gz files."; \
	  exit 1; \
	fi

train: venv dataset
	$(PY) -m pafm_jax.main --config=$(CONFIG) --workdir=$(WORKDIR) --config.data.idx_dir=$(FMNIST_DIR)

# One pytest worker per core (pytest-xdist); a test file's tests share a worker and its fixtures,
# and the longest files start first (tests/conftest.py).
XDIST ?= -n auto --dist loadfile --no-loadscope-reorder

test: venv dataset
	$(PY) -m pytest -q $(XDIST) --durations=20 tests $(PYTEST_ARGS)

# The inner loop: every test not marked slow (about 3 minutes on a 2-core machine).
test-fast: venv dataset
	$(PY) -m pytest -q $(XDIST) tests -m "not slow" $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
