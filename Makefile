# Two commands do everything on a fresh machine: `make run` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
CONFIG ?= jobs/configs/fashion_mnist.yaml
RUN_DIR ?= runs/fashion_mnist
PYTEST_ARGS ?=

.PHONY: setup run test clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,s3]'
	touch $(STAMP)

$(FMNIST):
	$(SUDO) apt-get update -q
	$(SUDO) apt-get install -y -q dataset-fashion-mnist

setup: $(STAMP) $(FMNIST)

run: setup
	$(PY) jobs/distill.py --config $(CONFIG) --run-dir $(RUN_DIR)

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

clean:
	rm -rf runs .pytest_cache
