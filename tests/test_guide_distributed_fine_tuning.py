"""guides/distributed_fine_tuning.py runs on 8 simulated CPU devices and its asserts hold.

Like tests/test_distribution.py, this runs in `make test-distribution` (8 devices) and skips
itself elsewhere. The guide runs in a subprocess of its own: it sets a global distribution
and the XLA device count itself, as a user's script would, and asserts what it prints (the
loss went down, the generated text is longer than its prompt).
"""

import os
import subprocess
import sys

import keras
import pytest

if keras.backend.backend() != "jax":
    pytest.skip("keras.distribution is JAX-only in Keras 3.15.1", allow_module_level=True)

import jax  # noqa: E402

if jax.device_count() < 8:
    pytest.skip("needs 8 devices: run `make test-distribution`", allow_module_level=True)

GUIDE = os.path.join(os.path.dirname(__file__), os.pardir, "guides", "distributed_fine_tuning.py")


def test_distributed_fine_tuning_guide_runs():
    environment = dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="3",
                       XLA_FLAGS="--xla_force_host_platform_device_count=8")
    result = subprocess.run([sys.executable, GUIDE], env=environment, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    lines = result.stdout.splitlines()
    assert lines[-1] == "done"
    losses = [float(x) for x in next(l for l in lines if l.startswith("loss per")).split()[3:]]
    assert losses[-1] < losses[0]
    assert sum(line.startswith("generated: ") for line in lines) == 2
    assert any("GiB of weights per device" in line for line in lines)
