"""LogitsCrossentropy equals Keras' SparseCategoricalCrossentropy(from_logits=True): values
and gradients with sample weights and every reduction, on every backend; compile() swaps
Keras' loss for it and the swap survives saving."""

import keras
import numpy as np
import pytest

from conftest import BACKEND
from conftest import tiny_config
from conftest import to_numpy
from keras_gemma import GemmaBackbone
from keras_gemma import GemmaCausalLM
from keras_gemma import LogitsCrossentropy


def _gradient(loss, labels, logits, sample_weight):
    """The loss's value and its gradient with respect to the logits."""
    if BACKEND == "jax":
        import jax

        value, gradient = jax.value_and_grad(
            lambda x: loss(labels, x, sample_weight=sample_weight))(logits)
        return float(value), np.asarray(gradient)
    if BACKEND == "tensorflow":
        import tensorflow as tf

        x = tf.constant(logits)
        with tf.GradientTape() as tape:
            tape.watch(x)
            value = loss(labels, x, sample_weight=sample_weight)
        return float(value), tape.gradient(value, x).numpy()
    import torch

    x = torch.tensor(logits, requires_grad=True)
    value = loss(labels, x, sample_weight=sample_weight)
    value.backward()
    return float(value), x.grad.numpy()


def _batch(seed=0, classes=37, out_of_range=False):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((3, 6, classes)) * 4).astype("float32")
    labels = rng.integers(0, classes, (3, 6)).astype("int32")
    if out_of_range:  # Keras' JAX loss counts these 0, its TensorFlow and torch ones refuse
        labels[0, 1], labels[2, 5] = -100, classes
    weights = rng.random((3, 6)).astype("float32")
    weights[1, :2] = 0.0
    return labels, logits, weights


@pytest.mark.parametrize("reduction", ["sum_over_batch_size", "sum", "mean"])
def test_value_and_gradient_equal_keras(reduction):
    labels, logits, weights = _batch()
    ours = _gradient(LogitsCrossentropy(reduction=reduction), labels, logits, weights)
    theirs = _gradient(
        keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=reduction),
        labels, logits, weights,
    )
    np.testing.assert_allclose(ours[0], theirs[0], rtol=1e-6)
    np.testing.assert_allclose(ours[1], theirs[1], rtol=1e-5, atol=1e-6)
    assert np.abs(ours[1]).max() > 1e-3  # a gradient that is really there


def test_per_token_values_labels_with_a_trailing_axis_and_out_of_range_labels():
    # Out-of-range labels count 0 where this class computes (JAX, TensorFlow), as in
    # Keras' JAX loss; on torch Keras' own loss runs, and refuses them.
    labels, logits, _ = _batch(seed=1, out_of_range=BACKEND != "torch")
    ours = to_numpy(LogitsCrossentropy(reduction=None)(labels[..., None], logits))
    shifted = logits - logits.max(-1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    valid = (labels >= 0) & (labels < logits.shape[-1])
    picked = np.take_along_axis(log_softmax, np.where(valid, labels, 0)[..., None], -1)[..., 0]
    np.testing.assert_allclose(ours, np.where(valid, -picked, 0.0), rtol=1e-5, atol=1e-6)
    if BACKEND != "torch":
        assert ours[0, 1] == 0.0 and ours[2, 5] == 0.0


def test_ignore_class_runs_keras_computation():
    labels, logits, _ = _batch(seed=2)
    labels[0, :3] = 5
    ours = LogitsCrossentropy(ignore_class=5)(labels, logits)
    theirs = keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=5)(
        labels, logits)
    np.testing.assert_allclose(to_numpy(ours), to_numpy(theirs), rtol=1e-6)


def test_replacing_swaps_only_keras_own_loss_from_logits():
    keras_loss = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction="sum", name="token_loss")
    swapped = LogitsCrossentropy.replacing(keras_loss)
    assert type(swapped) is LogitsCrossentropy
    assert (swapped.name, swapped.reduction) == ("token_loss", "sum")
    probabilities = keras.losses.SparseCategoricalCrossentropy(from_logits=False)
    assert LogitsCrossentropy.replacing(probabilities) is probabilities

    class Custom(keras.losses.SparseCategoricalCrossentropy):
        pass

    custom = Custom(from_logits=True)
    assert LogitsCrossentropy.replacing(custom) is custom
    assert LogitsCrossentropy.replacing("mse") == "mse"


def test_compile_uses_it_and_a_saved_model_reloads_it(tmp_path):
    lm = GemmaCausalLM(GemmaBackbone(**tiny_config()))
    assert type(lm.loss) is LogitsCrossentropy
    lm.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    assert type(lm.loss) is LogitsCrossentropy
    ids = np.random.default_rng(0).integers(0, 96, (2, 9)).astype("int32")
    x = {"token_ids": ids[:, :-1], "padding_mask": np.ones((2, 8), "int32")}
    lm.fit(x, ids[:, 1:], batch_size=2, epochs=1, verbose=0)
    path = str(tmp_path / "lm.keras")
    lm.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded.loss) is LogitsCrossentropy
    np.testing.assert_allclose(
        loaded.evaluate(x, ids[:, 1:], verbose=0)[0], lm.evaluate(x, ids[:, 1:], verbose=0)[0],
        rtol=1e-5,
    )
