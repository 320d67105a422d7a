"""`einsum(equation, inputs, kernel)` for 16-bit kernels under XLA on a CPU, in bounded memory.

XLA's CPU dot has no bfloat16 kernel: it converts both operands to float32 and multiplies in
float32. A weight's conversion depends on nothing but the weight, so XLA's scheduler is free
to run it anywhere, and it runs all of them first: a forward pass (or a training step) of a
bfloat16 model holds a float32 copy of every weight at once, and autodiff keeps each copy
alive until the backward pass needs it (a residual). Measured on this repository's CPU machine
(6 gemma_2b_en-shaped FFN layers, bfloat16, gradient of a small LoRA-like factor, 128 tokens):
805 MB of weights, 1.62 GB of XLA temporaries with `jnp.einsum`; 0.24 GB with this product.
At the 2B shape that is the difference between a LoRA step that needs ~15 GB and one that
fits in 8 (see benchmarks/finetune.py).

The product makes the float32 copy depend on the activations (it adds a zero read from
them, which XLA cannot fold away: `0 * x` is NaN for an infinite x), so the copy can only be
made when the layer runs, and a `jax.custom_vjp` keeps the 16-bit weight, not the copy, for
the backward pass, which converts again (tied to the incoming gradient). Optimization
barriers were tried first: XLA's CPU pipeline removes them before scheduling, and the copies
stayed (1.62 GB). Numerics are those of XLA's own bfloat16 dot: float32 products and sums,
the result rounded to the inputs' dtype.

Used by `GemmaEinsumDense` when training 16-bit kernels on the JAX backend on a CPU; everywhere else
(float32 kernels, GPUs and TPUs with native 16-bit dots, TensorFlow and PyTorch, whose CPU
kernels read bfloat16 directly) Keras' own einsum runs.
"""

import functools

import keras


def runs_here(kernel):
    """True when this product should replace `ops.einsum` for `kernel` (see the module doc)."""
    if keras.backend.backend() != "jax":
        return False
    if keras.backend.standardize_dtype(kernel.dtype) not in ("bfloat16", "float16"):
        return False
    import jax

    return jax.default_backend() == "cpu"


def runs_here_int8():
    """True when `int8_einsum` should replace Keras' weight-only int8 product in training."""
    if keras.backend.backend() != "jax":
        return False
    import jax

    return jax.default_backend() == "cpu"


def sixteen_bit_einsum(equation, inputs, kernel):
    """`einsum(equation, inputs, kernel)` in float32 with the result in `inputs.dtype`.

    Example:
    >>> x = keras.ops.ones((1, 3, 4), "bfloat16")
    >>> w = keras.ops.ones((8, 4), "bfloat16")
    >>> sixteen_bit_einsum("btd,fd->btf", x, w).shape
    (1, 3, 8)
    """
    return _product(equation)(inputs, kernel)


def zero_after(anchor, dtype):
    """A scalar zero of `dtype` that XLA can only compute once `anchor` exists.

    `0 * x` is NaN for an infinite x, so XLA cannot fold it away; adding it to a value ties
    that value's computation to `anchor` (the scheduler cannot hoist it earlier).
    """
    return (anchor.reshape(-1)[0] * 0).astype(dtype)


def _float32_after(weight, anchor):
    """`weight` in float32, computed no earlier than `anchor`."""
    import jax.numpy as jnp

    return weight.astype(jnp.float32) + zero_after(anchor, jnp.float32)


@functools.lru_cache(maxsize=None)
def _product(equation):
    import jax
    import jax.numpy as jnp

    def float32_einsum(inputs, kernel32):
        return jnp.einsum(
            equation, inputs.astype(jnp.float32), kernel32, preferred_element_type=inputs.dtype
        )

    @jax.custom_vjp
    def product(inputs, kernel):
        return float32_einsum(inputs, _float32_after(kernel, inputs))

    def forward(inputs, kernel):
        return product(inputs, kernel), (inputs, kernel)

    def backward(residuals, gradient):
        inputs, kernel = residuals
        # A frozen kernel's gradient is computed here and dropped by XLA when nobody reads it.
        _, pullback = jax.vjp(float32_einsum, inputs, _float32_after(kernel, gradient))
        inputs_gradient, kernel_gradient = pullback(gradient)
        return inputs_gradient, kernel_gradient.astype(kernel.dtype)

    product.defvjp(forward, backward)
    return product


def int8_einsum(equation, inputs, kernel, output_scale):
    """`einsum(equation, inputs, kernel) / output_scale` for an int8 `kernel` (Keras' weight-
    only int8 EinsumDense: `output_scale` is its `kernel_scale`, which broadcasts against the
    output), in float32, the result in `inputs.dtype`.

    The same trap as 16-bit weights: XLA converts every int8 kernel to float32 before the
    first layer runs, and a training step keeps the copies for the backward pass (a 2B int8 +
    LoRA step peaked at 21.8 GB with Keras' product). Here each conversion is tied to the
    layer's inputs, and the backward pass converts again, so one float32 kernel is alive at a
    time. The kernel and scale get no gradient (they are not trainable).

    Example:
    >>> x = keras.ops.ones((1, 3, 4))
    >>> w = keras.ops.ones((8, 4), "int8")
    >>> int8_einsum("btd,fd->btf", x, w, keras.ops.ones((8,))).shape
    (1, 3, 8)
    """
    return _int8_product(equation)(inputs, kernel, output_scale)


@functools.lru_cache(maxsize=None)
def _int8_product(equation):
    import jax
    import jax.numpy as jnp
    import numpy as np

    def scaled_einsum(inputs, kernel32, output_scale):
        outputs = jnp.einsum(
            equation, inputs.astype(jnp.float32), kernel32, preferred_element_type=jnp.float32
        )
        return (outputs / output_scale.astype(jnp.float32)).astype(inputs.dtype)

    @jax.custom_vjp
    def product(inputs, kernel, output_scale):
        return scaled_einsum(inputs, _float32_after(kernel, inputs), output_scale)

    def forward(inputs, kernel, output_scale):
        return product(inputs, kernel, output_scale), (inputs, kernel, output_scale)

    def backward(residuals, gradient):
        inputs, kernel, output_scale = residuals
        kernel32 = _float32_after(kernel, gradient)
        _, pullback = jax.vjp(lambda x: scaled_einsum(x, kernel32, output_scale), inputs)
        (inputs_gradient,) = pullback(gradient)
        no_gradient = np.zeros(kernel.shape, dtype=jax.dtypes.float0)
        return inputs_gradient, no_gradient, jnp.zeros_like(output_scale)

    product.defvjp(forward, backward)
    return product


def sixteen_bit_logits(hidden, embeddings, chunk_bytes=2**26):
    """`hidden @ embeddings.T` (tied logits) in float32 pieces of at most `chunk_bytes`.

    The embedding is the largest weight (gemma_2b_en: 256,000 x 2,048, 2.1 GB in float32):
    one float32 copy of it would take a third of a bfloat16 LoRA step's memory. Here it is
    converted a block of rows at a time, each block after the previous block's logits (and
    in the backward pass, after the previous block's share of the hidden-state gradient), so
    one block is alive at a time. The result is in `hidden.dtype`.

    Blocks of 64 MB (8,192 rows at the 2B width): in the 2B int8 + LoRA training step, XLA's
    temporaries were 0.95 GB with 256 MB blocks and 0.74 GB with these, and the logits'
    forward and backward passes took 0.86x the time (best of 4, interleaved; 32 MB: 0.87x).

    Example:
    >>> h = keras.ops.ones((1, 3, 4), "bfloat16")
    >>> table = keras.ops.ones((10, 4), "bfloat16")
    >>> sixteen_bit_logits(h, table, chunk_bytes=64).shape
    (1, 3, 10)
    """
    vocabulary, width = embeddings.shape
    rows = max(1, min(vocabulary, chunk_bytes // (4 * width)))
    return _chunked_logits(rows, False)(hidden, embeddings, None)


def int8_logits(hidden, embeddings, row_scale, chunk_bytes=2**26):
    """`hidden @ (embeddings / row_scale[:, None]).T` for Keras' int8 embedding (weight-only),
    a block of rows at a time as `sixteen_bit_logits` does: the 2B table is 0.5 GB in int8
    and 2.1 GB in float32. The table and its scale get no gradient (frozen).

    Example:
    >>> h = keras.ops.ones((1, 3, 4))
    >>> table = keras.ops.ones((10, 4), "int8")
    >>> int8_logits(h, table, keras.ops.ones((10,)), chunk_bytes=64).shape
    (1, 3, 10)
    """
    vocabulary, width = embeddings.shape
    rows = max(1, min(vocabulary, chunk_bytes // (4 * width)))
    return _chunked_logits(rows, True)(hidden, embeddings, row_scale)


@functools.lru_cache(maxsize=None)
def _chunked_logits(rows, scaled):
    import jax
    import jax.numpy as jnp
    import numpy as np

    def blocks(vocabulary):
        return [(start, min(start + rows, vocabulary)) for start in range(0, vocabulary, rows)]

    def table_block(embeddings, row_scale, start, stop, anchor):
        table = _float32_after(embeddings[start:stop], anchor)
        if scaled:
            table = table / row_scale[start:stop, None].astype(jnp.float32)
        return table

    def forward_logits(hidden, embeddings, row_scale):
        hidden32 = hidden.astype(jnp.float32)
        pieces, anchor = [], hidden
        for start, stop in blocks(embeddings.shape[0]):
            table = table_block(embeddings, row_scale, start, stop, anchor)
            anchor = jnp.einsum("...d,vd->...v", hidden32, table).astype(hidden.dtype)
            pieces.append(anchor)
        return jnp.concatenate(pieces, axis=-1)

    @jax.custom_vjp
    def logits(hidden, embeddings, row_scale):
        return forward_logits(hidden, embeddings, row_scale)

    def forward(hidden, embeddings, row_scale):
        return forward_logits(hidden, embeddings, row_scale), (hidden, embeddings, row_scale)

    def backward(residuals, gradient):
        hidden, embeddings, row_scale = residuals
        hidden32 = hidden.astype(jnp.float32)
        hidden_gradient = jnp.zeros(hidden.shape, jnp.float32)
        table_gradients = []
        # Each block's table and its slice of the gradient wait for the previous block's
        # product; the first waits for the incoming gradient. Anchored on the zeros above
        # (a constant), XLA ran the first block's conversion before the forward pass and held
        # it through the step; unanchored, it made every slice at once (2B int8 + LoRA: one
        # 268 MB block and 131 MB of slices more in the step's peak).
        anchor = gradient
        for start, stop in blocks(embeddings.shape[0]):
            piece = gradient[..., start:stop].astype(jnp.float32) + zero_after(
                anchor, jnp.float32)
            table = table_block(embeddings, row_scale, start, stop, anchor)
            hidden_gradient = hidden_gradient + jnp.einsum("...v,vd->...d", piece, table)
            anchor = hidden_gradient
            if not scaled:  # dropped by XLA when the embedding is frozen (LoRA)
                table_gradients.append(
                    jnp.einsum("...v,...d->vd", piece, hidden32).astype(embeddings.dtype)
                )
        if scaled:
            table_gradient = np.zeros(embeddings.shape, dtype=jax.dtypes.float0)
            return hidden_gradient.astype(hidden.dtype), table_gradient, jnp.zeros_like(row_scale)
        table_gradient = jnp.concatenate(table_gradients, axis=0)
        return hidden_gradient.astype(hidden.dtype), table_gradient, None

    logits.defvjp(forward, backward)
    return logits
