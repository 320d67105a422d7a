"""LogitsAccuracy counts what Keras' SparseCategoricalAccuracy counts (ties included), on
every backend and for vocabulary sizes with and without a block size; compile() swaps
Keras' metric for it."""

import keras
import numpy as np
import pytest

from conftest import tiny_config
from conftest import to_numpy
from keras_gemma import GemmaBackbone
from keras_gemma import GemmaCausalLM
from keras_gemma import LogitsAccuracy
from keras_gemma.logits_accuracy import _block_size
from keras_gemma.logits_accuracy import first_index_of_max


@pytest.mark.parametrize("classes", [16384, 1000, 97, 64])
def test_accuracy_equals_keras_with_ties_and_weights(classes):
    rng = np.random.default_rng(classes)
    logits = rng.standard_normal((3, 7, classes)).astype("float32")
    labels = logits.argmax(-1)
    labels[1] = rng.integers(0, classes, 7)
    # Ties: the label at the second of two equal maxima is a miss, at the first a hit.
    logits[0, 2, [5, classes - 3]] = 50.0
    labels[0, 2] = classes - 3
    logits[0, 3, [1, classes - 1]] = 50.0
    labels[0, 3] = 1
    weights = rng.random((3, 7)).astype("float32")
    ours, theirs = LogitsAccuracy(), keras.metrics.SparseCategoricalAccuracy()
    ours.update_state(labels, logits, sample_weight=weights)
    theirs.update_state(labels, logits, sample_weight=weights)
    assert 0.2 < float(theirs.result()) < 0.9
    np.testing.assert_allclose(float(ours.result()), float(theirs.result()), rtol=1e-6)
    # A column of labels, as Keras also takes them.
    ours.reset_state()
    theirs.reset_state()
    ours.update_state(labels[..., None], logits)
    theirs.update_state(labels[..., None], logits)
    np.testing.assert_allclose(float(ours.result()), float(theirs.result()), rtol=1e-6)


def test_first_index_of_max_equals_argmax():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((5, 4096)).astype("float32")
    logits[2, [7, 300, 4000]] = 9.0  # the first of three equal maxima
    np.testing.assert_array_equal(to_numpy(first_index_of_max(logits)), logits.argmax(-1))


def test_block_sizes():
    assert _block_size(262144) == 512  # Gemma 3
    assert _block_size(256000) == 500  # Gemma 1 and 2
    assert _block_size(97) is None  # a prime: Keras' argmax
    assert _block_size(64) is None  # sqrt(64) = 8 < 16: Keras' argmax


def test_replacing_and_compile():
    keras_metric = keras.metrics.SparseCategoricalAccuracy(name="token_accuracy")
    swapped = LogitsAccuracy.replacing(keras_metric)
    assert type(swapped) is LogitsAccuracy and swapped.name == "token_accuracy"
    other = keras.metrics.SparseTopKCategoricalAccuracy()
    assert LogitsAccuracy.replacing(other) is other
    lm = GemmaCausalLM(GemmaBackbone(**tiny_config()))
    lm.compile(weighted_metrics=[keras_metric], metrics=(other,))
    ids = np.random.default_rng(0).integers(0, 96, (2, 9)).astype("int32")
    x = {"token_ids": ids[:, :-1], "padding_mask": np.ones((2, 8), "int32")}
    logs = lm.fit(x, ids[:, 1:], batch_size=2, epochs=1, verbose=0).history
    assert "token_accuracy" in logs and "sparse_top_k_categorical_accuracy" in logs
    metrics = lm._compile_metrics._user_weighted_metrics
    assert [type(metric) for metric in metrics] == [LogitsAccuracy]
