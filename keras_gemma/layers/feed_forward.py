"""Gemma's gated feed-forward network."""

import keras
from keras import ops

from keras_gemma.layers.decode_matmul import decode_matmul
from keras_gemma.layers.decode_matmul import is_decode_step
from keras_gemma.layers.initialization import initializer


@keras.saving.register_keras_serializable(package="keras_gemma")
class GemmaFeedForward(keras.layers.Layer):
    """GELU-gated feed-forward: `down(gelu_tanh(gate(x)) * up(x))`.

    `intermediate_dim` follows KerasHub's convention: it is twice the width of the gate and
    up projections (gemma_2b_en: 32768, so the projections are 16384 wide). Kernels are
    stored (out, in): gate and up (width, hidden), down (hidden, width); see decode_matmul.py.

    Args:
        intermediate_dim: twice the FFN width.

    Example:
    >>> ffn = GemmaFeedForward(intermediate_dim=64)
    >>> ffn(keras.ops.ones((2, 3, 16))).shape
    (2, 3, 16)
    """

    def __init__(self, intermediate_dim, **kwargs):
        super().__init__(**kwargs)
        self.intermediate_dim = intermediate_dim

    def build(self, input_shape):
        hidden_dim = input_shape[-1]
        width = self.intermediate_dim // 2
        self.gate_dense = keras.layers.EinsumDense(
            "btd,fd->btf",
            output_shape=(None, width),
            kernel_initializer=initializer("glorot_uniform"),
            dtype=self.dtype_policy,
            name="gate",
        )
        self.gate_dense.build(input_shape)
        self.up_dense = keras.layers.EinsumDense(
            "btd,fd->btf",
            output_shape=(None, width),
            kernel_initializer=initializer("glorot_uniform"),
            dtype=self.dtype_policy,
            name="up",
        )
        self.up_dense.build(input_shape)
        self.down_dense = keras.layers.EinsumDense(
            "btf,df->btd",
            output_shape=(None, hidden_dim),
            kernel_initializer=initializer("glorot_uniform"),
            dtype=self.dtype_policy,
            name="down",
        )
        self.down_dense.build((None, None, width))
        self.built = True

    def call(self, inputs):
        if is_decode_step(self.gate_dense, inputs):
            return self._decode_step(inputs)
        gate = keras.activations.gelu(self.gate_dense(inputs), approximate=True)
        return self.down_dense(gate * self.up_dense(inputs))

    def _decode_step(self, inputs):
        rows = ops.reshape(inputs, (inputs.shape[0], inputs.shape[2]))

        def project(dense, values):
            return decode_matmul(values, ops.cast(dense.kernel, dense.compute_dtype))

        gate = keras.activations.gelu(project(self.gate_dense, rows), approximate=True)
        output = project(self.down_dense, gate * project(self.up_dense, rows))
        return ops.expand_dims(output, 1)

    def get_config(self):
        config = super().get_config()
        config.update({"intermediate_dim": self.intermediate_dim})
        return config
