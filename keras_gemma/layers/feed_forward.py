"""Gemma's gated feed-forward network, as three projections owned by the decoder block.

The projections are attributes of `GemmaDecoderBlock` itself, under KerasHub's names
(`ffw_gating`, `ffw_gating_2`, `ffw_linear`), so that variable paths such as
`decoder_block_3/ffw_gating/kernel` are the ones KerasHub users write in layout maps,
`enable_lora(target_layer_names=...)` and weight surgery. This module makes them and runs them.
"""

import keras
from keras import ops

from keras_gemma.layers.decode_matmul import decode_matmul
from keras_gemma.layers.decode_matmul import is_decode_step
from keras_gemma.layers.gated_gelu import gated_gelu
from keras_gemma.layers.initialization import initializer
from keras_gemma.layers.lora_einsum import GemmaEinsumDense
from keras_gemma.layers.shared_rows import decode_products
from keras_gemma.layers.shared_rows import share_rows


def feed_forward_projections(hidden_dim, intermediate_dim, dtype):
    """`(gating, gating_2, linear)` EinsumDense layers, built, with kernels stored (out, in).

    `intermediate_dim` follows KerasHub's convention: it is twice the width of the gating
    projections (gemma_2b_en: 32768, so they are 16384 wide). gating and gating_2 kernels are
    (width, hidden), linear's is (hidden, width); see decode_matmul.py for why (out, in).

    Example:
    >>> gating, gating_2, linear = feed_forward_projections(16, 64, "float32")
    >>> tuple(gating.kernel.shape), tuple(linear.kernel.shape)
    ((32, 16), (16, 32))
    """
    width = intermediate_dim // 2

    def dense(equation, output_width, name):
        return GemmaEinsumDense(
            equation,
            output_shape=(None, output_width),
            kernel_initializer=initializer("glorot_uniform"),
            dtype=dtype,
            name=name,
        )

    gating = dense("btd,fd->btf", width, "ffw_gating")
    gating_2 = dense("btd,fd->btf", width, "ffw_gating_2")
    linear = dense("btf,df->btd", hidden_dim, "ffw_linear")
    return gating, gating_2, linear


def build_feed_forward(gating, gating_2, linear, input_shape):
    gating.build(input_shape)
    gating_2.build(input_shape)
    share_rows([gating._kernel, gating_2._kernel])  # torch: one decode product for both
    linear.build((None, None, gating.kernel.shape[0]))


def gated_feed_forward(gating, gating_2, linear, inputs, training=None):
    """`linear(gelu_tanh(gating(x)) * gating_2(x))` for `inputs` [batch, seq, hidden].

    A decode step (one token per row) takes the products through `decode_matmul`, the
    fastest form per backend and dtype; LoRA is included because `dense.kernel` merges it.
    """
    if not is_decode_step(gating, inputs):
        # gated_gelu: a training step keeps only the two projections for backward.
        # `training` explicitly: a rematerialized block recomputes outside its call context.
        gate = gating(inputs, training=training)
        return linear(gated_gelu(gate, gating_2(inputs, training=training)), training=training)
    rows = ops.reshape(inputs, (inputs.shape[0], inputs.shape[2]))

    def kernel(dense):
        return ops.cast(dense.kernel, dense.compute_dtype)

    gate, up = decode_products(rows, [kernel(gating), kernel(gating_2)])
    output = decode_matmul(keras.activations.gelu(gate, approximate=True) * up, kernel(linear))
    return ops.expand_dims(output, 1)
