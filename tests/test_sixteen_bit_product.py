"""The 16-bit training product: same numbers as a float32 reference, bounded XLA memory."""

import keras
import numpy as np
import pytest
from conftest import BACKEND, to_numpy

from keras_gemma.layers import sixteen_bit_product
from keras_gemma.layers.lora_einsum import GemmaEinsumDense


def _bfloat16_values(shape, seed):
    """Random values exactly representable in bfloat16, as float32."""
    values = np.random.default_rng(seed).normal(0, 0.5, shape).astype("float32")
    return to_numpy(keras.ops.cast(keras.ops.cast(values, "bfloat16"), "float32"))


def test_it_runs_only_where_xla_converts_16_bit_weights():
    kernel16 = keras.ops.ones((3, 4), "bfloat16")
    kernel32 = keras.ops.ones((3, 4), "float32")
    assert sixteen_bit_product.runs_here(kernel32) is False
    assert sixteen_bit_product.runs_here(kernel16) is (BACKEND == "jax")


@pytest.mark.parametrize("equation", ["btd,fd->btf", "btnh,dnh->btd"])
def test_training_call_equals_a_float32_reference_and_its_gradient(equation):
    """A bfloat16 layer called with training=True (the product on JAX, Keras' einsum
    elsewhere) equals numpy's float32 einsum of the same bfloat16 values, rounded once."""
    inputs_shape = (2, 5, 8) if equation.startswith("btd") else (2, 5, 2, 4)
    output_shape = (None, 6) if equation.startswith("btd") else (None, 8)
    layer = GemmaEinsumDense(equation, output_shape=output_shape, dtype="bfloat16")
    layer.build(inputs_shape)
    kernel = _bfloat16_values(layer.kernel.shape, seed=1)
    layer.kernel.assign(kernel)
    inputs = _bfloat16_values(inputs_shape, seed=2)
    expected = np.einsum(equation, inputs, kernel)

    # One bfloat16 rounding of a float32 result; TensorFlow's own CPU einsum (Eigen) also
    # rounds partial sums to bfloat16 (measured up to 0.74%), so it gets a looser bound.
    rtol = 2 ** -6 if BACKEND == "tensorflow" else 2 ** -8
    outputs = to_numpy(keras.ops.cast(layer(inputs, training=True), "float32"))
    np.testing.assert_allclose(outputs, expected, rtol=rtol, atol=1e-6)
    inference = to_numpy(keras.ops.cast(layer(inputs, training=False), "float32"))
    np.testing.assert_allclose(outputs, inference, rtol=2 * rtol, atol=1e-6)

    if BACKEND != "jax":
        return
    import jax
    import jax.numpy as jnp

    def loss(x, w):
        product = sixteen_bit_product.sixteen_bit_einsum(equation, x, w)
        return jnp.sum(product.astype(jnp.float32) ** 2)

    def reference_loss(x, w):  # XLA's own bfloat16 product and its gradient
        return jnp.sum(jnp.einsum(equation, x, w).astype(jnp.float32) ** 2)

    x, w = jnp.asarray(inputs, jnp.bfloat16), jnp.asarray(kernel, jnp.bfloat16)
    gradients = jax.grad(loss, argnums=(0, 1))(x, w)
    expected_gradients = jax.grad(reference_loss, argnums=(0, 1))(x, w)
    for actual, wanted in zip(gradients, expected_gradients):
        assert actual.dtype == jnp.bfloat16
        wanted = np.asarray(wanted, "float32")
        # Both round the incoming gradient and the result to bfloat16 (8 significant bits),
        # at places that differ: a few units of bfloat16 rounding of the largest entry.
        np.testing.assert_allclose(
            np.asarray(actual, "float32"), wanted, rtol=0, atol=2 ** -6 * np.abs(wanted).max()
        )


def test_a_training_step_does_not_hold_a_float32_copy_of_every_weight():
    """XLA's temporaries for the gradient of a small factor through six bfloat16 layers:
    with Keras' einsum they hold all six weights in float32; with the product, about one."""
    if BACKEND != "jax":
        pytest.skip("the float32 copies are XLA-on-CPU's (JAX); TF and torch read bfloat16")
    import jax
    import jax.numpy as jnp

    if jax.default_backend() != "cpu":
        pytest.skip("on GPUs and TPUs XLA multiplies bfloat16 directly")
    layers, width, hidden = 6, 1024, 256
    weights = [jnp.full((width, hidden), 0.01, jnp.bfloat16) for _ in range(layers)]
    factor = jnp.full((hidden, 2), 0.01, jnp.float32)
    inputs = jnp.ones((16, hidden), jnp.bfloat16)

    def loss(product, factor, weights, x):
        for weight in weights:
            up = product("td,fd->tf", x, weight)
            x = x + product("tf,fd->td", up, weight) + (
                x.astype(jnp.float32) @ factor @ factor.T
            ).astype(x.dtype)
        return jnp.sum(x.astype(jnp.float32) ** 2)

    def temporaries(product):
        step = jax.jit(jax.grad(lambda *a: loss(product, *a)))
        return step.lower(factor, weights, inputs).compile().memory_analysis().temp_size_in_bytes

    float32_weights = layers * width * hidden * 4
    plain = temporaries(jnp.einsum)
    ours = temporaries(sixteen_bit_product.sixteen_bit_einsum)
    print(f"XLA temporaries: jnp.einsum {plain / 1e6:.1f} MB, product {ours / 1e6:.1f} MB "
          f"(float32 weights {float32_weights / 1e6:.1f} MB)")
    assert plain >= float32_weights  # what the product is for: still true of XLA here
    assert ours < 0.4 * float32_weights


@pytest.mark.parametrize("soft_cap", [None, 5.0])
def test_tied_logits_in_blocks_equal_a_float32_reference_and_its_gradient(soft_cap):
    from keras_gemma.layers.tied_embedding import GemmaReversibleEmbedding

    embedding = GemmaReversibleEmbedding(
        37, 8, tie_weights=True, logit_soft_cap=soft_cap, dtype="bfloat16"
    )
    embedding.build((None,))
    table = _bfloat16_values((37, 8), seed=3)
    embedding.embeddings.assign(table)
    hidden = _bfloat16_values((2, 5, 8), seed=4)
    expected = hidden @ table.T
    if soft_cap is not None:
        expected = np.tanh(expected / soft_cap) * soft_cap
    for training in (True, False):
        logits = to_numpy(keras.ops.cast(embedding(hidden, reverse=True, training=training),
                                         "float32"))
        np.testing.assert_allclose(logits, expected, rtol=2 ** -7, atol=1e-5)

    if BACKEND != "jax":
        return
    import jax
    import jax.numpy as jnp

    x, w = jnp.asarray(hidden, jnp.bfloat16), jnp.asarray(table, jnp.bfloat16)
    weights = jnp.asarray(np.random.default_rng(5).normal(size=(2, 5, 37)), jnp.float32)

    def loss(chunk_bytes):  # 8 columns of 4 bytes a row: 3 rows a block, 13 blocks
        def value(x, w):
            logits = sixteen_bit_product.sixteen_bit_logits(x, w, chunk_bytes=chunk_bytes)
            return jnp.sum(logits.astype(jnp.float32) * weights)
        return value

    def reference(x, w):
        return jnp.sum(jnp.einsum("btd,vd->btv", x, w).astype(jnp.float32) * weights)

    for actual, wanted in zip(jax.grad(loss(96), argnums=(0, 1))(x, w),
                              jax.grad(reference, argnums=(0, 1))(x, w)):
        wanted = np.asarray(wanted, "float32")
        np.testing.assert_allclose(
            np.asarray(actual, "float32"), wanted, rtol=0, atol=2 ** -6 * np.abs(wanted).max()
        )


@pytest.mark.parametrize("table_dtype", ["bfloat16", "int8"])
def test_tied_logits_hold_one_block_of_the_table_in_float32(table_dtype):
    """The gradient of the tied logits, in blocks of 1/8 of the table: XLA's temporaries hold
    about one float32 block (measured 0.14 of the table), not the whole table (x @ w.T), nor
    two blocks (0.27: the backward pass's first block, anchored on nothing, was converted
    before the forward pass and held through it)."""
    if BACKEND != "jax":
        pytest.skip("the float32 copies are XLA-on-CPU's (JAX); TF and torch read bfloat16")
    import jax
    import jax.numpy as jnp

    if jax.default_backend() != "cpu":
        pytest.skip("on GPUs and TPUs XLA multiplies bfloat16 directly")
    vocabulary, width = 8192, 256
    int8 = table_dtype == "int8"
    table = jnp.full((vocabulary, width), 1 if int8 else 0.01, table_dtype)
    row_scale = jnp.full((vocabulary,), 100.0, jnp.float32)
    dtype = jnp.float32 if int8 else jnp.bfloat16
    hidden = jnp.ones((4, width), dtype)
    factor = jnp.full((width, width), 0.01, jnp.float32)
    float32_table = vocabulary * width * 4

    def blocks(x, w):
        if int8:
            return sixteen_bit_product.int8_logits(x, w, row_scale, float32_table // 8)
        return sixteen_bit_product.sixteen_bit_logits(x, w, chunk_bytes=float32_table // 8)

    def temporaries(logits_of):
        def loss(factor):
            x = (hidden.astype(jnp.float32) @ factor).astype(dtype)
            return jnp.sum(logits_of(x, table).astype(jnp.float32) ** 2)
        return jax.jit(jax.grad(loss)).lower(factor).compile().memory_analysis().temp_size_in_bytes

    plain = temporaries(lambda x, w: x @ (w.astype(dtype) / (row_scale[:, None] if int8 else 1)).T)
    ours = temporaries(blocks)
    print(f"XLA temporaries: x @ w.T {plain / 1e6:.1f} MB, in blocks {ours / 1e6:.1f} MB "
          f"(float32 table {float32_table / 1e6:.1f} MB)")
    assert plain >= float32_table
    assert ours < 0.2 * float32_table


def _int8_values(shape, seed):
    return np.random.default_rng(seed).integers(-127, 128, shape).astype("int8")


@pytest.mark.parametrize("equation", ["btd,fd->btf", "btnh,dnh->btd"])
def test_int8_training_products_equal_the_dequantized_float32_ones(equation):
    """Weight-only int8 with training=True (the bounded-memory products on JAX, Keras'
    elsewhere): outputs and input gradients equal float32 numpy on the dequantized weights."""
    inputs_shape = (2, 5, 8) if equation.startswith("btd") else (2, 5, 2, 4)
    output_shape = (None, 6) if equation.startswith("btd") else (None, 8)
    layer = GemmaEinsumDense(equation, output_shape=output_shape)
    layer.build(inputs_shape)
    layer.quantize("int8")
    assert layer.inputs_quantizer is None  # keras_gemma's int8 is weight-only
    layer._kernel.assign(_int8_values(layer._kernel.shape, seed=1))
    scale = np.random.default_rng(2).uniform(50, 100, layer.kernel_scale.shape).astype("float32")
    layer.kernel_scale.assign(scale)
    # Keras' own broadcast of the per-channel scale against the kernel.
    kernel_scale = to_numpy(layer._adjust_scale_for_dequant(keras.ops.convert_to_tensor(scale)))
    kernel = to_numpy(layer._kernel).astype("float32") / kernel_scale
    inputs = np.random.default_rng(3).normal(size=inputs_shape).astype("float32")
    expected = np.einsum(equation, inputs, kernel)
    outputs = to_numpy(layer(inputs, training=True))
    tolerance = 2 ** -7 * np.abs(expected).max() if BACKEND == "torch" else 1e-5
    np.testing.assert_allclose(outputs, expected, rtol=0, atol=tolerance)
    if BACKEND == "jax":
        import jax

        upstream = np.random.default_rng(4).normal(size=expected.shape).astype("float32")
        gradient = jax.grad(lambda x: (layer(x, training=True) * upstream).sum())(inputs)
        letters = equation.split("->")[1] + "," + equation.split(",")[1].split("->")[0]
        wanted = np.einsum(f"{letters}->{equation.split(',')[0]}", upstream, kernel)
        np.testing.assert_allclose(np.asarray(gradient), wanted, rtol=1e-5, atol=1e-5)

    from keras_gemma.layers.tied_embedding import GemmaReversibleEmbedding

    embedding = GemmaReversibleEmbedding(37, 8, tie_weights=True, logit_soft_cap=3.0)
    embedding.build((None,))
    embedding.quantize("int8")
    embedding._embeddings.assign(_int8_values((37, 8), seed=5))
    row_scale = np.random.default_rng(6).uniform(50, 100, (37,)).astype("float32")
    embedding.embeddings_scale.assign(row_scale)
    table = to_numpy(embedding._embeddings).astype("float32") / row_scale[:, None]
    hidden = np.random.default_rng(7).normal(size=(2, 5, 8)).astype("float32")
    expected = np.tanh(hidden @ table.T / 3.0) * 3.0
    logits = to_numpy(embedding(hidden, reverse=True, training=True))
    # Without a gradient to take, torch's packed int8 kernel may serve this call, with its
    # activations in bfloat16 (one rounding of 8 bits); the other backends run float32.
    tolerance = 2 ** -7 * np.abs(expected).max() if BACKEND == "torch" else 1e-5
    np.testing.assert_allclose(logits, expected, rtol=0, atol=tolerance)
    if BACKEND == "jax":
        import jax.numpy as jnp

        weights = np.random.default_rng(8).normal(size=expected.shape).astype("float32")
        for chunk_bytes in (96, 2**28):  # 3 rows a block, and the whole table at once
            gradient = jax.grad(lambda h: jnp.sum(sixteen_bit_product.int8_logits(
                h, jnp.asarray(embedding._embeddings.value), jnp.asarray(row_scale),
                chunk_bytes=chunk_bytes) * weights))(hidden)
            np.testing.assert_allclose(np.asarray(gradient), weights @ table, rtol=1e-5,
                                       atol=1e-5)
