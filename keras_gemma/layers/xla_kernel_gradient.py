"""Training products on JAX and TensorFlow on a CPU whose kernel gradient is in dot order.

Every kernel here is stored [outputs..., inputs...] (decode_matmul.py), the tied logits'
table [vocabulary, hidden] too. Autodiff writes a kernel's gradient as
`d_outputs.T @ inputs`, and XLA's CPU dot wants that left operand with its contracted
(token) axis last: it transposes the [tokens, outputs] gradient first, fused with whatever
computes it (the loss's softmax for the logits, the gated GELU's backward pass for the
feed-forward kernels), which then runs in transposed order. In a profile of the small full
fit (benchmarks/finetune.py, JAX) the logits' fusion alone took 18 ms of a 317 ms step,
and each decoder block had two such feed-forward fusions of 3-7 ms. Here the gradient is
written `(inputs.T @ d_outputs).T`; XLA folds that back into one dot that reads the
gradient as it was computed (its dot thunk takes either operand order), and no
transposing fusion is left.

Measured on this repository's 2-core CPU (JAX):
- tied logits and Keras' loss, forward and gradient (512 tokens, hidden 512, vocabulary
  16,384): 112 -> 102 ms; with LogitsCrossentropy 100 -> 84 ms (the three products alone
  ~80 ms);
- the small full fit's step (4 layers, float32, 4 x 128 tokens; the loss and accuracy of
  logits_crossentropy.py and logits_accuracy.py in both): with the dense kernels' products
  here as well 287-290 -> 267-272 ms.

The hidden states' gradient through the tied logits, `d_logits @ table`, contracts the whole
vocabulary, and XLA's CPU dot slows as a contraction grows ([128, K] @ [K, 2048]: 437
GFLOP/s at K = 2,048, 378 at 32,000, 167 at 256,000): at the 2B shape it took 800 ms of a
~4 s LoRA step, twice the forward logits (355 ms), in KerasHub as well. Above 32,768
outputs the product here sums dots over slices of 1,024-2,048 rows in a loop: 804 -> 404
ms (slices of 8,000 rows: 428 ms; slices copied out first, or unrolled: no gain).
benchmarks/finetune.py, 2B LoRA float32, JAX: 1.18x -> 1.30x KerasHub's tokens/s.

Used in training on JAX and TensorFlow on a CPU for float32 kernels: by
`GemmaReversibleEmbedding` (tied logits) and `GemmaEinsumDense` (kernels [outputs...,
inputs...] without bias). On TensorFlow the product is `tf.matmul(rows, weight,
transpose_b=True)`, whose own gradient already reads the operands through transpose flags
(TensorFlow's einsum transposed the kernels instead: 34 transposes a step forward and 45
backward in the small full fit); with XLA, which GemmaCausalLM turns on there for float32
(causal_lm.py), its step went 265-268 -> 217-219 ms. 16-bit kernels keep their own form
(sixteen_bit_product.py); accelerators and PyTorch keep the plain product.
"""

import functools
import math

import keras
from keras import ops

from keras_gemma.layers import decode_matmul
from keras_gemma.layers import quantized_products


def runs_here(kernel, training):
    """True when the products here should compute training products with `kernel`."""
    if not training or keras.backend.backend() not in ("jax", "tensorflow"):
        return False
    if keras.backend.standardize_dtype(kernel.dtype) != "float32":
        return False
    return decode_matmul.xla_runs_on_cpu()


def einsum(equation, inputs, kernel):
    """`einsum(equation, inputs, kernel)` for a kernel [outputs..., inputs...] (an equation
    that `quantized_products.matrix_form` reads), with the gradients described above.

    Example:
    >>> einsum("btd,nhd->btnh", keras.ops.ones((2, 3, 4)), keras.ops.ones((5, 6, 4))).shape
    (2, 3, 5, 6)
    """
    batch_axes, output_axes = quantized_products.matrix_form(equation)
    inputs = ops.convert_to_tensor(inputs)
    kernel = ops.convert_to_tensor(kernel)
    # The batch axes may be unknown while TensorFlow traces (`fit` on a dataset).
    batch_shape = tuple(ops.shape(inputs)[:batch_axes])
    output_shape = tuple(kernel.shape[:output_axes])
    rows = ops.reshape(inputs, (-1, math.prod(kernel.shape[output_axes:])))
    weight = ops.reshape(kernel, (math.prod(output_shape), -1))
    if keras.backend.backend() == "tensorflow":
        # TensorFlow's own gradient of a product with a transposed operand reads it through
        # the product's transpose flags: the same dots, with no custom gradient needed.
        import tensorflow as tf

        return ops.reshape(tf.matmul(rows, weight, transpose_b=True), batch_shape + output_shape)
    return ops.reshape(_jax_product()(rows, weight), batch_shape + output_shape)


def tied_logits(hidden, table):
    """`hidden @ table.T` over the last axis, with the gradients described above.

    Example:
    >>> tied_logits(keras.ops.ones((2, 3, 4)), keras.ops.ones((10, 4))).shape
    (2, 3, 10)
    """
    batch = "abcefg"[: len(hidden.shape) - 1]
    return einsum(f"{batch}d,vd->{batch}v", hidden, table)


@functools.lru_cache(maxsize=None)
def _jax_product():
    import jax

    @jax.custom_vjp
    def product(rows, weight):  # [tokens, inputs] x [outputs, inputs] -> [tokens, outputs]
        return rows @ weight.T

    def forward(rows, weight):
        return product(rows, weight), (rows, weight)

    def backward(saved, upstream):
        rows, weight = saved
        return _input_gradient(upstream, weight), (rows.T @ upstream).T

    def _input_gradient(upstream, weight):
        # [tokens, outputs] @ [outputs, inputs], contracting the outputs: for the tied
        # logits that is the vocabulary, and XLA's CPU dot slows with so long a contraction
        # (module docstring); a loop over slices of the vocabulary keeps each dot short.
        outputs = weight.shape[0]
        chunk = _chunk_size(outputs)
        if chunk is None:
            return upstream @ weight

        def add_chunk(index, total):
            start = index * chunk
            gradient = jax.lax.dynamic_slice_in_dim(upstream, start, chunk, axis=1)
            kernel = jax.lax.dynamic_slice_in_dim(weight, start, chunk, axis=0)
            return total + gradient @ kernel

        initial = jax.numpy.zeros((upstream.shape[0], weight.shape[1]), upstream.dtype)
        return jax.lax.fori_loop(0, outputs // chunk, add_chunk, initial)

    product.defvjp(forward, backward)
    return product


def _chunk_size(outputs):
    """A divisor of `outputs` from 1,024 to 2,048 when `outputs` exceeds 32,768, else None."""
    if outputs <= 32768:
        return None
    return next((size for size in range(2048, 1023, -1) if outputs % size == 0), None)
