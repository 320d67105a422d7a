# Two commands for a newcomer:
#   make demo   installs keras_gemma and generates text
#   make test   installs what the tests need and runs the suite on JAX, TensorFlow and PyTorch
PYTHON ?= python3
PIP = $(PYTHON) -m pip
TORCH_WHEEL ?= torch==2.13.0

.PHONY: install install-dev demo test test-jax test-tensorflow test-torch

install:
	$(PIP) install -q "$(TORCH_WHEEL)"
	$(PIP) install -q -e ".[all]"

install-dev:
	$(PIP) install -q "$(TORCH_WHEEL)"
	$(PIP) install -q -e ".[dev]"

demo: install
	KERAS_BACKEND=jax $(PYTHON) -m keras_gemma.demo

test: install-dev test-jax test-tensorflow test-torch

test-jax:
	KERAS_BACKEND=jax $(PYTHON) -m pytest -q -p no:cacheprovider tests

test-tensorflow:
	KERAS_BACKEND=tensorflow $(PYTHON) -m pytest -q -p no:cacheprovider tests

test-torch:
	KERAS_BACKEND=torch $(PYTHON) -m pytest -q -p no:cacheprovider tests
