# Two commands for a newcomer:
#   make demo   installs keras_gemma with the real Gemma 3 270M weights and generates text
#   make test   installs what the tests need and runs the suite on JAX, TensorFlow and PyTorch
PYTHON ?= python3
PIP = $(PYTHON) -m pip
# A CPU build of torch; installed first so that the "torch>=2.4" range pulls nothing more.
TORCH ?= torch==2.13.0
PROMPT ?= Once upon a time
BACKEND ?= jax

.PHONY: install install-dev demo test test-jax test-tensorflow test-torch test-distribution

install:
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[all]"

install-dev:
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[dev]"

demo: install
	KERAS_BACKEND=$(BACKEND) keras-gemma generate "$(PROMPT)" --max-length 64

# One pytest process keeps about one core busy (JAX's suite: 830 s of CPU in 782 s), so two
# backends run side by side on a 2-core machine (test_samplers.py on JAX and TensorFlow:
# 68 s one after the other, 41 s side by side; the whole suite 1,441 s, JAX and TensorFlow
# side by side taking 1,095 s); each one's output is printed when it ends.
# TEST_JOBS=1 runs them one after another.
TEST_JOBS ?= 2
test: install-dev
	$(MAKE) -k -j$(TEST_JOBS) --output-sync=target test-jax test-tensorflow test-torch test-distribution

PYTEST = $(PYTHON) -m pytest -q -p no:cacheprovider tests

test-jax:
	KERAS_BACKEND=jax $(PYTEST)

test-tensorflow:
	KERAS_BACKEND=tensorflow $(PYTEST)

test-torch:
	KERAS_BACKEND=torch $(PYTEST)

# keras.distribution on 8 simulated CPU devices: XLA reads the device count when JAX starts,
# so this needs its own process (these modules skip themselves in the runs above).
DISTRIBUTION_TESTS = test_distribution.py test_distribution_generate.py \
	test_distribution_presets.py test_guide_distributed_fine_tuning.py
test-distribution:
	XLA_FLAGS=--xla_force_host_platform_device_count=8 KERAS_BACKEND=jax \
		$(PYTHON) -m pytest -q -p no:cacheprovider $(addprefix tests/,$(DISTRIBUTION_TESTS))
