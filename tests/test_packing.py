"""Packing: short examples share a row, and each one's loss is the loss it has alone.

The reference for a packed example is the same example run alone (padded, ordinary 0/1
mask) through the same model; the packed row must give the same summed loss per example.
The model has a sliding window shorter than the examples and Gemma 2/3 switches on, so the
window, the post-norms and the QK-norm all see packed rows.
"""

import keras
import numpy as np
import pytest
from conftest import tiny_config, to_numpy

from keras_gemma import GemmaBackbone, GemmaCausalLM
from keras_gemma.layers.attention import segment_mask_and_positions
from keras_gemma.packing import pack_rows, shifted_weights
from keras_gemma.preprocessor import GemmaCausalLMPreprocessor
from keras_gemma.tokenizer import GemmaTokenizer

PROMPTS = ["hello world", "The quick brown fox", "a", "jumps over", "the lazy dog"]
RESPONSES = ["yes", "jumps over the lazy dog.", "b c", "quick", "brown"]


@pytest.fixture(scope="module")
def tokenizer(sentencepiece_proto):
    return GemmaTokenizer(proto=sentencepiece_proto)


def _model(tokenizer):
    backbone = GemmaBackbone(
        **tiny_config(
            vocabulary_size=tokenizer.vocabulary_size(),
            use_post_attention_norm=True,
            use_post_ffw_norm=True,
            use_query_key_norm=True,
            attention_logit_soft_cap=4.0,
            use_sliding_window_attention=True,
            sliding_window_size=3,
            local_rope_max_wavelength=100.0,
        )
    )
    return GemmaCausalLM(backbone)


def _token_losses(lm, x, y):
    logits = lm(x)
    losses = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
    return to_numpy(losses)


def test_segment_ids_mask_and_positions():
    visible, positions = segment_mask_and_positions(
        keras.ops.convert_to_tensor(np.array([[1, 1, 2, 2, 3, 0]], "int32"))
    )
    assert to_numpy(positions).tolist() == [[0, 1, 0, 1, 0, 5]]
    visible = to_numpy(visible)[0]
    assert visible[3].tolist() == [False, False, True, True, False, False]  # own example only
    assert visible[5].tolist() == [True] * 5 + [False]  # padding sees real keys, as before
    # An ordinary 0/1 mask: every query sees every real key, positions 0, 1, 2, ...
    visible, positions = segment_mask_and_positions(keras.ops.convert_to_tensor([[1, 1, 0]]))
    assert to_numpy(positions).tolist() == [[0, 1, 2]]
    assert to_numpy(visible)[0].tolist() == [[True, True, False]] * 3


def test_pack_rows_first_fit():
    ids = np.array([[2, 5, 1, 0], [2, 6, 7, 1], [2, 0, 0, 0]], "int32")
    mask = ids > 0
    packed, segments, trained = pack_rows(ids, mask, mask)
    # The third example does not fit beside the second, but does in the first row's slot.
    assert packed.tolist() == [[2, 5, 1, 2], [2, 6, 7, 1]]
    assert segments.tolist() == [[1, 1, 1, 2], [1, 1, 1, 1]]
    assert trained.tolist() == (segments > 0).tolist()
    # The label after an example's last token starts another example: weight 0.
    assert shifted_weights(np.array([[1, 1, 2, 2, 0]]), np.ones((1, 5), bool)).tolist() == [
        [True, False, True, False]
    ]
    with pytest.raises(ValueError, match="right-padded"):
        pack_rows(ids, ids == 0, mask)


def test_packed_losses_equal_losses_one_by_one_and_fit(tokenizer):
    lm = _model(tokenizer)
    data = {"prompts": PROMPTS, "responses": RESPONSES}
    alone = GemmaCausalLMPreprocessor(tokenizer, sequence_length=16)
    packed = GemmaCausalLMPreprocessor(tokenizer, sequence_length=16, packing=True)
    x, y, weights = keras.tree.map_structure(to_numpy, alone(data))
    px, py, pweights = keras.tree.map_structure(to_numpy, packed(data))
    assert px["token_ids"].shape[0] < x["token_ids"].shape[0]  # some rows were shared
    assert px["padding_mask"].max() >= 2
    # One call for both (rows are independent): one set of shapes to trace on every backend.
    both = {key: np.concatenate([x[key].astype("int32"), px[key]]) for key in x}
    all_losses = _token_losses(lm, both, np.concatenate([y, py]))
    expected = (all_losses[: len(y)] * weights).sum(axis=1)
    losses = all_losses[len(y) :] * pweights
    # The examples, in order, are the segments of the packed rows (first fit keeps order
    # within a row); match each by its summed weight and its tokens.
    found = []
    for row in range(px["token_ids"].shape[0]):
        for segment in range(1, px["padding_mask"][row].max() + 1):
            where = px["padding_mask"][row] == segment
            tokens = px["token_ids"][row][where].tolist()
            example = next(
                i for i in range(len(PROMPTS))
                if x["token_ids"][i][: len(tokens)].tolist() == tokens and i not in found
            )
            found.append(example)
            np.testing.assert_allclose(losses[row][where].sum(), expected[example], atol=1e-5)
            assert pweights[row][where].sum() == weights[example].sum()
    assert sorted(found) == list(range(len(PROMPTS)))

    # fit takes the same data through a packing preprocessor. Eager steps on TensorFlow and
    # torch (this checks the data path, and tracing a step costs more than the rest); JAX
    # runs op by op slower than it compiles the step.
    lm.preprocessor = packed
    lm.compile(run_eagerly=keras.backend.backend() != "jax")
    history = lm.fit(data, batch_size=2, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert GemmaCausalLMPreprocessor.from_config(packed.get_config()).packing


def test_ordinary_mask_is_the_cached_paths_mask(tokenizer):
    """A 0/1 mask through the full-sequence path (which now reads segment ids) gives the
    logits of the cached path (which kept the padding-mask code unchanged), at every position,
    padding included, for right and left padding: 0/1 masks behave as they always have."""
    lm = _model(tokenizer)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 100, size=(2, 7)).astype("int32")
    mask = np.array([[1, 1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1, 1]], "int32")
    full = to_numpy(lm({"token_ids": ids, "padding_mask": mask}))
    cache = lm.empty_cache(2, 7)
    cached = to_numpy(lm.call_with_cache(ids, cache, 0, padding_mask=mask)[0])
    np.testing.assert_allclose(full, cached, atol=1e-5)
