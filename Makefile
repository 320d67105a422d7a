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
# run side by side on a 2-core machine (test_samplers.py on JAX and TensorFlow: 68 s one
# after the other, 41 s side by side); each one's output is printed when it ends.
# Each backend's suite runs in two halves, so that the shorter jobs fill whichever core frees
# first (session 8, quiet machine: JAX's suite alone ran ~1,450 s in one process and set the
# time; TensorFlow's halves 488 s and 711 s).
# TEST_JOBS=1 runs them one after another.
TEST_JOBS ?= 2
.PHONY: test-jax-1 test-jax-2 test-tensorflow-1 test-tensorflow-2 test-torch-1 test-torch-2
test: install-dev
	$(MAKE) -k -j$(TEST_JOBS) --output-sync=target test-jax-1 test-jax-2 test-tensorflow-1 \
		test-tensorflow-2 test-torch-1 test-torch-2 test-distribution

PYTEST = $(PYTHON) -m pytest -q -p no:cacheprovider
FIRST_HALF = $(sort $(wildcard tests/test_[a-f]*.py tests/test_ge*.py))
SECOND_HALF = $(filter-out $(FIRST_HALF),$(sort $(wildcard tests/test_*.py)))

test-jax: test-jax-1 test-jax-2
test-jax-1:
	KERAS_BACKEND=jax $(PYTEST) $(FIRST_HALF)
test-jax-2:
	KERAS_BACKEND=jax $(PYTEST) $(SECOND_HALF)

test-tensorflow: test-tensorflow-1 test-tensorflow-2
test-tensorflow-1:
	KERAS_BACKEND=tensorflow $(PYTEST) $(FIRST_HALF)
test-tensorflow-2:
	KERAS_BACKEND=tensorflow $(PYTEST) $(SECOND_HALF)

test-torch: test-torch-1 test-torch-2
test-torch-1:
	KERAS_BACKEND=torch $(PYTEST) $(FIRST_HALF)
test-torch-2:
	KERAS_BACKEND=torch $(PYTEST) $(SECOND_HALF)

# keras.distribution on 8 simulated CPU devices: XLA reads the device count when JAX starts,
# so this needs its own process (these modules skip themselves in the runs above).
DISTRIBUTION_TESTS = test_distribution.py test_distribution_generate.py \
	test_distribution_presets.py test_guide_distributed_fine_tuning.py
test-distribution:
	XLA_FLAGS=--xla_force_host_platform_device_count=8 KERAS_BACKEND=jax \
		$(PYTEST) $(addprefix tests/,$(DISTRIBUTION_TESTS))
