"""GemmaCausalLM.score, KerasHub's usage verbatim, against KerasHub's own score()."""

import keras
import numpy as np
import pytest
from keras import ops

from conftest import BACKEND, to_numpy
from keras_hub_models import keras_hub_causal_lm


@pytest.fixture(scope="module")
def pair(sentencepiece_proto, tmp_path_factory):
    """KerasHub's tiny GemmaCausalLM and ours loaded from the preset KerasHub saved."""
    from keras_gemma import GemmaCausalLM

    reference = keras_hub_causal_lm("gemma", sentencepiece_proto)
    directory = str(tmp_path_factory.mktemp("keras_hub_gemma"))
    reference.save_to_preset(directory)
    return reference, GemmaCausalLM.from_preset(directory)


def _batch(lm):
    generations = ["The quick brown fox jumps", "hello world"]
    preprocessed = lm.preprocessor.generate_preprocess(generations)
    return preprocessed["token_ids"], preprocessed["padding_mask"]


def test_logits_and_losses_match_keras_hub(pair):
    reference, ours = pair
    generation_ids, padding_mask = _batch(reference)
    target_ids = keras.ops.roll(generation_ids, shift=-1, axis=1)
    expected_logits = to_numpy(reference.score(generation_ids, padding_mask))
    actual_logits = to_numpy(ours.score(generation_ids, padding_mask))
    assert actual_logits.shape == expected_logits.shape == (2, 24, 1000)
    present = to_numpy(padding_mask).astype(bool)
    assert expected_logits[present].std() > 0.1
    np.testing.assert_allclose(actual_logits[present], expected_logits[present], atol=1e-5, rtol=0)

    expected_loss = to_numpy(
        reference.score(
            token_ids=generation_ids,
            padding_mask=padding_mask,
            scoring_mode="loss",
            target_ids=target_ids,
        )
    )
    actual_loss = to_numpy(
        ours.score(
            token_ids=generation_ids,
            padding_mask=padding_mask,
            scoring_mode="loss",
            target_ids=target_ids,
        )
    )
    assert actual_loss.shape == (2, 24)
    np.testing.assert_allclose(actual_loss, expected_loss, atol=1e-5, rtol=1e-5)


def test_layer_intercept_fn_matches_keras_hub_on_decoder_layers(pair):
    reference, ours = pair
    generation_ids, padding_mask = _batch(reference)
    seen = {"keras_hub": [], "ours": []}

    def intercept(record):
        def layer_intercept_fn(x, i):
            record.append(i)
            return x * 0.5 if i == 1 else x

        return layer_intercept_fn

    expected = to_numpy(
        reference.score(generation_ids, padding_mask, layer_intercept_fn=intercept(seen["keras_hub"]))
    )
    actual = to_numpy(
        ours.score(generation_ids, padding_mask, layer_intercept_fn=intercept(seen["ours"]))
    )
    assert seen["ours"] == seen["keras_hub"] == [-1, 0, 1, 2]
    plain = to_numpy(ours.score(generation_ids, padding_mask))
    assert np.abs(actual - plain).max() > 1e-2  # the intervention took effect
    present = to_numpy(padding_mask).astype(bool)
    np.testing.assert_allclose(actual[present], expected[present], atol=1e-5, rtol=0)


def test_an_intervention_on_the_embeddings_takes_effect(pair):
    """KerasHub 0.32 drops what the function returns at -1; we use it."""
    _, ours = pair
    generation_ids, padding_mask = _batch(ours)
    doubled = to_numpy(
        ours.score(
            generation_ids, padding_mask, layer_intercept_fn=lambda x, i: x * 2 if i == -1 else x
        )
    )
    original = to_numpy(ours.backbone.token_embedding.embeddings)

    # The same intervention made by hand: the lookup from a doubled table.
    def lookup_doubled(x, i):
        return x if i != -1 else ops.take(ops.convert_to_tensor(original * 2), generation_ids, axis=0)

    by_hand = to_numpy(ours.score(generation_ids, padding_mask, layer_intercept_fn=lookup_doubled))
    np.testing.assert_allclose(doubled, by_hand, atol=1e-5, rtol=0)
    assert np.abs(doubled - to_numpy(ours.score(generation_ids, padding_mask))).max() > 1e-2


def test_padding_mask_defaults_to_ones(pair):
    _, ours = pair
    ids = np.array([[2, 10, 11, 12]], dtype="int32")
    np.testing.assert_array_equal(
        to_numpy(ours.score(ids)), to_numpy(ours.score(ids, np.ones_like(ids)))
    )


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.GradientTape is TensorFlow's")
def test_keras_hub_gradient_recipe_runs(pair):
    import tensorflow as tf

    _, gemma_lm = pair
    generation_ids, padding_mask = _batch(gemma_lm)
    target_ids = keras.ops.roll(generation_ids, shift=-1, axis=1)
    embeddings = None
    with tf.GradientTape(watch_accessed_variables=True) as tape:

        def layer_intercept_fn(x, i):
            if i == -1:
                nonlocal embeddings, tape
                embeddings = x
                tape.watch(embeddings)
            return x

        losses = gemma_lm.score(
            token_ids=generation_ids,
            padding_mask=padding_mask,
            scoring_mode="loss",
            layer_intercept_fn=layer_intercept_fn,
            target_ids=target_ids,
        )
    grads = tape.gradient(losses, embeddings)
    assert grads.shape == embeddings.shape and float(tf.reduce_max(tf.abs(grads))) > 0


def test_bad_arguments_are_explained(pair):
    _, ours = pair
    ids = np.array([[2, 10, 11]], dtype="int32")
    with pytest.raises(ValueError, match="scoring_mode must be one of"):
        ours.score(ids, scoring_mode="probabilities")
    with pytest.raises(ValueError, match="needs target_ids"):
        ours.score(ids, scoring_mode="loss")
    with pytest.raises(ValueError, match=r"\[batch, tokens\]"):
        ours.score(np.array([2, 10, 11], dtype="int32"))
