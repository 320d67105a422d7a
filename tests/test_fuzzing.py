"""Fuzzing (hypothesis) of what takes arbitrary text: the tokenizer, the preprocessor and
generate(), with empty, whitespace-only, control-character, very long and invalid (lone
surrogate) strings, batch sizes and max_length values at the edges.

The contracts checked, for any such input:
- tokenizer: ids are int32 inside the vocabulary and read back to the same text; a lone
  surrogate (no UTF-8 form) is a ValueError naming it, never a crash inside SentencePiece.
- preprocessor (training call): token_ids, padding_mask, y and sample_weight are all
  [batch, sequence_length]; each row starts with <bos>, its mask is a run of ones then zeros,
  y is token_ids shifted by one and sample_weight is the mask shifted by one.
  generate_preprocess: [batch, sequence_length] with <bos> first, and a prompt that fits
  reads back from generate_postprocess unchanged.
- generate: one string per prompt; on token ids, the output is [batch, max_length], keeps
  each prompt's tokens where its mask is set, holds only ids of the vocabulary, and its mask
  is the prompt's run extended by a run of generated tokens.

Cost: one tiny model per module. generate compiles one program per batch size and prefill
length (3-7 s each on JAX and TensorFlow), so its fuzzing keeps both fixed: batches of two
prompts, one of them empty (prefill from <bos> alone, the shortest prompt there is), the
other drawn; max_length is drawn from 2 (the least), 3 and 16, inside one length bucket, where
it is a runtime value. One program in all.
"""

import numpy as np
import pytest
from conftest import tiny_config, to_numpy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keras_gemma import GemmaBackbone, GemmaCausalLM, GemmaCausalLMPreprocessor, GemmaTokenizer

VOCABULARY = 1000
# The function-scoped autouse seed fixture does not matter to these tests.
FUZZ = settings(max_examples=12, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

# Text a user (or a web form) may send. U+2581 reads back as a space (test_tokenizer.py says
# why) and surrogates have no UTF-8 form: both have tests of their own.
_CHARACTERS = st.characters(exclude_categories=("Cs",), exclude_characters="\u2581")
TEXT = st.one_of(
    st.just(""),
    st.text(alphabet=" \t\n\r\x0b\x0c\u00a0\u3000", max_size=20),  # whitespace only
    st.text(alphabet=st.characters(categories=("Cc", "Cf")), max_size=20),  # control, format
    st.text(alphabet=_CHARACTERS, max_size=40),
    st.builds(lambda piece, count: piece * count, st.text(alphabet=_CHARACTERS, min_size=1,
                                                          max_size=4), st.integers(200, 800)),
)
BATCH = st.lists(TEXT, min_size=1, max_size=2)
# Inside one length bucket (16): the edges 2 (the least) and 16, and one between.
MAX_LENGTH = st.sampled_from([2, 3, 16])


@pytest.fixture(scope="module")
def lm(sentencepiece_proto):
    backbone = GemmaBackbone(**tiny_config(vocabulary_size=VOCABULARY), dtype="float32")
    rng = np.random.default_rng(0)
    for variable in backbone.weights:  # random norms too, so that outputs vary
        variable.assign(rng.normal(0, 0.3, variable.shape).astype("float32"))
    preprocessor = GemmaCausalLMPreprocessor(GemmaTokenizer(proto=sentencepiece_proto),
                                             sequence_length=16)
    return GemmaCausalLM(backbone, preprocessor, compile=False)


@FUZZ
@given(text=TEXT)
def test_tokenizer_round_trip(lm, text):
    tokenizer = lm.preprocessor.tokenizer
    ids = np.asarray(tokenizer(text))
    assert ids.dtype == np.int32 and ids.ndim == 1
    assert ((0 <= ids) & (ids < VOCABULARY)).all()
    assert tokenizer.detokenize(ids) == text


@FUZZ
@given(text=TEXT, position=st.integers(0, 40), surrogate=st.integers(0xD800, 0xDFFF))
def test_lone_surrogate_is_a_clear_error_everywhere(lm, text, position, surrogate):
    position = min(position, len(text))
    bad = text[:position] + chr(surrogate) + text[position:]
    match = rf"holds the lone surrogate .* at position {position}"
    with pytest.raises(ValueError, match=match):
        lm.preprocessor.tokenizer(bad)
    with pytest.raises(ValueError, match=match):
        lm.preprocessor([bad])
    with pytest.raises(ValueError, match=match):
        lm.generate(bad, max_length=8)


def _is_prefix_mask(mask):
    """Each row is a run of ones followed by zeros."""
    mask = np.asarray(mask, bool)
    return bool((np.diff(mask.astype(int), axis=1) <= 0).all())


@FUZZ
@given(batch=BATCH, sequence_length=MAX_LENGTH)
def test_preprocessor_shapes_and_shift(lm, batch, sequence_length):
    preprocessor = lm.preprocessor
    bos = preprocessor.tokenizer.start_token_id
    x, y, sample_weight = preprocessor(batch, sequence_length=sequence_length)
    ids, mask = to_numpy(x["token_ids"]), to_numpy(x["padding_mask"])
    y, sample_weight = to_numpy(y), to_numpy(sample_weight)
    shape = (len(batch), sequence_length)
    assert ids.shape == mask.shape == y.shape == sample_weight.shape == shape
    assert (ids[:, 0] == bos).all() and _is_prefix_mask(mask)
    np.testing.assert_array_equal(y[:, :-1], ids[:, 1:])
    np.testing.assert_array_equal(sample_weight[:, :-1].astype(bool), mask[:, 1:].astype(bool))

    packed = preprocessor.generate_preprocess(batch, sequence_length=sequence_length)
    prompt_ids, prompt_mask = to_numpy(packed["token_ids"]), to_numpy(packed["padding_mask"])
    assert prompt_ids.shape == prompt_mask.shape == shape
    assert (prompt_ids[:, 0] == bos).all() and _is_prefix_mask(prompt_mask)
    texts = preprocessor.generate_postprocess(packed)
    for text, prompt, row_mask in zip(texts, batch, prompt_mask):
        length = len(preprocessor.tokenizer(prompt)) + 1  # with <bos>
        if length <= sequence_length:  # it fit, untruncated
            assert text == prompt and row_mask.sum() == length


@FUZZ
@given(text=TEXT, empty_first=st.booleans(), max_length=MAX_LENGTH)
def test_generate_keeps_its_contract(lm, text, empty_first, max_length):
    batch = ["", text] if empty_first else [text, ""]
    strings = lm.generate(batch, max_length=max_length)
    assert isinstance(strings, list) and len(strings) == len(batch)
    assert all(isinstance(s, str) for s in strings)

    prompts = lm.preprocessor.generate_preprocess(batch, sequence_length=max_length)
    prompt_ids, prompt_mask = to_numpy(prompts["token_ids"]), to_numpy(prompts["padding_mask"])
    output = lm.generate(prompts, max_length=max_length)
    ids, mask = output["token_ids"], output["padding_mask"].astype(bool)
    assert ids.shape == mask.shape == (len(batch), max_length)
    assert ((0 <= ids) & (ids < VOCABULARY)).all()
    prompt_mask = prompt_mask.astype(bool)
    np.testing.assert_array_equal(ids[prompt_mask], prompt_ids[prompt_mask])
    assert (mask >= prompt_mask).all() and _is_prefix_mask(mask)
