"""Tied logits for float32 training on JAX on a CPU, with the table's gradient in order.

The logits are `hidden @ table.T` with the table stored [vocabulary, hidden]. Autodiff
writes the table's gradient as `d_logits.T @ hidden`, and XLA's CPU dot wants that
left operand with its contracted (token) axis last: it transposes the [tokens,
vocabulary] gradient first, fused with whatever computes it (the loss's softmax), which
then runs in transposed order. In a profile of the small full fit (benchmarks/finetune.py,
JAX) that fusion alone took 18 ms of a 317 ms step. Here the gradient is
`(hidden.T @ d_logits).T`: the transposed operand is the [tokens, hidden] activations
(16 to 32 times smaller), and the result is transposed as a plain copy.

Measured on this repository's 2-core CPU (JAX; 512 tokens, hidden 512, vocabulary 16,384,
logits and Keras' loss, forward and gradient): 112 -> 102 ms; with LogitsCrossentropy
100 -> 84 ms (the three products alone: ~80 ms).

Used by `GemmaReversibleEmbedding` in training on JAX on a CPU for float32 tables; 16-bit
tables keep their own form (sixteen_bit_product.py), accelerators and PyTorch keep the
plain product. TensorFlow too: Keras runs it without XLA on a CPU (`jit_compile` "auto"),
where the same custom gradient was slower (TensorFlow's oneDNN einsum with Keras' loss
70.7 ms, this form 82.6 ms, same shapes as above).
"""

import functools

import keras
from keras import ops

from keras_gemma.layers import decode_matmul


def runs_here(table, training):
    """True when `tied_logits` should compute training logits with `table` (JAX on a CPU)."""
    if not training or keras.backend.backend() != "jax":
        return False
    if keras.backend.standardize_dtype(table.dtype) != "float32":
        return False
    return decode_matmul.xla_runs_on_cpu()


def tied_logits(hidden, table):
    """`hidden @ table.T` over the last axis, with the gradients described above.

    Example:
    >>> tied_logits(keras.ops.ones((2, 3, 4)), keras.ops.ones((10, 4))).shape
    (2, 3, 10)
    """
    hidden = ops.convert_to_tensor(hidden)
    table = ops.convert_to_tensor(table)
    return _jax_tied_logits()(hidden, table)


@functools.lru_cache(maxsize=None)
def _jax_tied_logits():
    import jax
    import jax.numpy as jnp

    @jax.custom_vjp
    def logits(hidden, table):
        return jnp.einsum("...d,vd->...v", hidden, table)

    def forward(hidden, table):
        return logits(hidden, table), (hidden, table)

    def backward(saved, upstream):
        hidden, table = saved
        hidden_gradient = jnp.einsum("...v,vd->...d", upstream, table)
        rows = hidden.reshape(-1, hidden.shape[-1])
        table_gradient = (rows.T @ upstream.reshape(-1, upstream.shape[-1])).T
        return hidden_gradient, table_gradient

    logits.defvjp(forward, backward)
    return logits
