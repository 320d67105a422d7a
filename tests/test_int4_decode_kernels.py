"""int4_decode_kernels: which int4 layers take a kernel dequantized once per generate()
call, the kernel's values, and the thread's mapping while a step is traced."""

import keras
import numpy as np
import pytest
from conftest import BACKEND
from conftest import assign_random_weights
from conftest import tiny_config
from conftest import to_numpy

from keras_gemma import GemmaBackbone
from keras_gemma.layers import int4_decode_kernels
from keras_gemma.layers import int4_kernel
from keras_gemma.layers.decode_matmul import xla_runs_on_cpu


def _int4_backbone(config=None):
    backbone = GemmaBackbone(**tiny_config())
    assign_random_weights(backbone)
    backbone.quantize("int4", config=config)
    return backbone


def test_every_int4_projection_takes_a_kernel_as_dequantized_in_bfloat16():
    backbone = _int4_backbone()
    block = backbone.transformer_layers[0]
    layers = int4_decode_kernels.eligible_layers(block)
    assert sorted(layer.name for layer in layers) == sorted(
        ["query", "key", "value", "attention_output", "ffw_gating", "ffw_gating_2",
         "ffw_linear"]
    )
    # Blocks of one structure list their layers alike (a shared block program relies on it).
    other = int4_decode_kernels.eligible_layers(backbone.transformer_layers[1])
    assert [layer.name for layer in other] == [layer.name for layer in layers]
    for layer in layers:
        kernel = to_numpy(keras.ops.cast(int4_decode_kernels.dequantized(layer), "float32"))
        # Keras' int4 values and group scale/zero, read back with numpy: value = (q - zero)
        # * scale for each group of 32 inputs; [in, out] -> the kernel's [out, in].
        values = to_numpy(int4_kernel.unpacked(layer)).astype(np.float64)
        group = layer._int4_block_size
        scale = np.repeat(to_numpy(layer.kernel_scale).astype(np.float64), group, axis=0)
        zero = np.repeat(to_numpy(layer.kernel_zero).astype(np.float64), group, axis=0)
        rows = values.shape[0]
        expected = ((values - zero[:rows]) * scale[:rows]).T
        assert kernel.shape == expected.shape
        np.testing.assert_allclose(kernel, expected, rtol=2**-8, atol=0)


def test_provided_maps_layers_on_this_thread_and_restores_what_was_there():
    backbone = _int4_backbone()
    first, second = int4_decode_kernels.eligible_layers(backbone.transformer_layers[0])[:2]
    assert int4_decode_kernels.kernel_for(first) is None
    with int4_decode_kernels.provided([first], ["kernel a"]):
        with int4_decode_kernels.provided([second], ["kernel b"]):
            assert int4_decode_kernels.kernel_for(first) == "kernel a"
            assert int4_decode_kernels.kernel_for(second) == "kernel b"
        assert int4_decode_kernels.kernel_for(second) is None
    assert int4_decode_kernels.kernel_for(first) is None
    with pytest.raises(ValueError, match="2 int4 layers, but 1 kernels"):
        with int4_decode_kernels.provided([first, second], ["kernel a"]):
            pass


def test_applies_to_int4_projections_under_jax_on_a_cpu_but_not_an_int4_embedding():
    jax_cpu = BACKEND == "jax" and xla_runs_on_cpu()
    assert int4_decode_kernels.applies(_int4_backbone()) == jax_cpu
    # Keras' own int4 config: the tied embedding is int4 too, which a step would dequantize
    # whole at every token; such a model keeps the one-loop program.
    everything = _int4_backbone(keras.quantizers.Int4QuantizationConfig(block_size=32))
    assert everything.token_embedding.quantization_mode == "int4"
    assert not int4_decode_kernels.applies(everything)
    float_backbone = GemmaBackbone(**tiny_config())
    assert not int4_decode_kernels.applies(float_backbone)
