"""The tied logits' training product (xla_kernel_gradient.py): the same logits and gradients as
the plain product, through GemmaReversibleEmbedding in training, on every backend (it
applies on JAX and TensorFlow on a CPU; on torch the plain product runs and must agree)."""

import numpy as np

from conftest import BACKEND
from keras_gemma.layers import xla_kernel_gradient
from keras_gemma.layers.tied_embedding import GemmaReversibleEmbedding


def _logits_and_gradients(layer, hidden, upstream):
    """Training logits of `hidden`, and the gradients of sum(logits * upstream)."""
    if BACKEND == "jax":
        import jax

        def objective(hidden, table):
            values, _ = layer.stateless_call([table], [], hidden, reverse=True, training=True)
            return (values * upstream).sum(), values

        (_, values), (hidden_gradient, table_gradient) = jax.value_and_grad(
            objective, argnums=(0, 1), has_aux=True)(hidden, layer.embeddings.value)
        return np.asarray(values), np.asarray(hidden_gradient), np.asarray(table_gradient)
    if BACKEND == "tensorflow":
        import tensorflow as tf

        hidden = tf.constant(hidden)
        with tf.GradientTape() as tape:
            tape.watch(hidden)
            values = layer(hidden, reverse=True, training=True)
            objective = tf.reduce_sum(values * upstream)
        hidden_gradient, table_gradient = tape.gradient(objective, [hidden, layer.embeddings])
        return values.numpy(), hidden_gradient.numpy(), tf.convert_to_tensor(table_gradient).numpy()
    import torch

    hidden = torch.tensor(hidden, requires_grad=True)
    values = layer(hidden, reverse=True, training=True)
    (values * torch.tensor(upstream)).sum().backward()
    table_gradient = layer.embeddings.value.grad
    return (values.detach().numpy(), hidden.grad.numpy(), table_gradient.cpu().numpy())


def test_training_logits_and_gradients_equal_the_plain_product():
    rng = np.random.default_rng(0)
    layer = GemmaReversibleEmbedding(50, 16, tie_weights=True)
    layer.build((None,))
    table = rng.standard_normal((50, 16)).astype("float32")
    layer.embeddings.assign(table)
    hidden = rng.standard_normal((2, 3, 16)).astype("float32")
    upstream = rng.standard_normal((2, 3, 50)).astype("float32")
    values, hidden_gradient, table_gradient = _logits_and_gradients(layer, hidden, upstream)
    np.testing.assert_allclose(values, hidden @ table.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(hidden_gradient, upstream @ table, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        table_gradient, upstream.reshape(-1, 50).T @ hidden.reshape(-1, 16), rtol=1e-5, atol=1e-5)
    assert xla_kernel_gradient.runs_here(layer.embeddings, True) == (BACKEND != "torch")
    assert not xla_kernel_gradient.runs_here(layer.embeddings, False)


def test_long_vocabulary_input_gradient_in_slices_equals_numpy():
    # More than 32,768 outputs: the input gradient sums dots over slices of the vocabulary.
    from keras_gemma.layers.xla_kernel_gradient import _chunk_size

    vocabulary = 33792
    assert _chunk_size(vocabulary) == 1536 and _chunk_size(16384) is None
    rng = np.random.default_rng(1)
    layer = GemmaReversibleEmbedding(vocabulary, 8, tie_weights=True)
    layer.build((None,))
    table = rng.standard_normal((vocabulary, 8)).astype("float32")
    layer.embeddings.assign(table)
    hidden = rng.standard_normal((1, 3, 8)).astype("float32")
    upstream = rng.standard_normal((1, 3, vocabulary)).astype("float32")
    _, hidden_gradient, table_gradient = _logits_and_gradients(layer, hidden, upstream)
    np.testing.assert_allclose(hidden_gradient, upstream @ table, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(
        table_gradient, upstream.reshape(-1, vocabulary).T @ hidden.reshape(-1, 8),
        rtol=1e-5, atol=1e-5)
