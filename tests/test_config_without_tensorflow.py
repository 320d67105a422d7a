"""Quantizing while loading keeps TensorFlow out of a JAX or PyTorch process."""

import os
import subprocess
import sys

import keras
from conftest import tiny_config

import keras_gemma
from keras_gemma.config_without_tensorflow import config_of
from keras_gemma.layers.lora_einsum import GemmaEinsumDense

_CHILD = """
import sys
import keras_gemma
keras_gemma.GemmaCausalLM.from_preset(sys.argv[1], quantize="int8")
print("tensorflow imported:", "tensorflow" in sys.modules)
"""


def test_config_is_get_config():
    layer = GemmaEinsumDense("btd,fd->btf", output_shape=(None, 8))
    layer.build((None, None, 4))
    assert config_of(layer) == layer.get_config()
    backbone = keras_gemma.GemmaBackbone(**tiny_config())
    assert config_of(backbone) == backbone.get_config()


def test_quantized_loading_does_not_import_tensorflow(tiny_preset, backend):
    # On the TensorFlow backend the question is moot; its child asks it of JAX instead.
    child_backend = "jax" if backend == "tensorflow" else backend
    environment = dict(os.environ, KERAS_BACKEND=child_backend, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, tiny_preset], env=environment,
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "tensorflow imported: False" in result.stdout


def test_serializer_state_is_restored():
    from keras.src.utils import module_utils

    before = module_utils.tensorflow._available
    config_of(keras.layers.Dense(4))
    assert module_utils.tensorflow._available == before
