"""GemmaCausalLMPreprocessor: packing, shifting, generation in and out, graphs, config."""

import json
import warnings

import keras
import numpy as np
import pytest
from conftest import to_numpy
from tokenizer_corpus import CORPUS

from keras_gemma.preprocessor import GemmaCausalLMPreprocessor
from keras_gemma.tokenizer import GemmaTokenizer

BOS, EOS, PAD = 2, 1, 0


@pytest.fixture(scope="module")
def tokenizer(sentencepiece_proto):
    return GemmaTokenizer(proto=sentencepiece_proto)


@pytest.fixture
def preprocessor(tokenizer):
    return GemmaCausalLMPreprocessor(tokenizer, sequence_length=12)


def _numpy(outputs):
    """The preprocessor's outputs (backend tensors) as numpy arrays, in the same structure."""
    return keras.tree.map_structure(to_numpy, outputs)


def _expected_packed(tokenizer, text, length, start=True, end=True):
    """The packed row written out by hand: [bos] + ids (truncated) + [eos], then padding."""
    ids = tokenizer(text).tolist()
    room = length - start - end
    row = [BOS] * start + ids[:room] + [EOS] * end
    return row + [PAD] * (length - len(row)), [True] * len(row) + [False] * (length - len(row))


def test_training_outputs_are_the_shifted_sequence(tokenizer, preprocessor):
    texts = ["hello world", "", "The quick brown fox jumps over the lazy dog.", "a"]
    x, y, sample_weight = _numpy(preprocessor(texts))
    assert set(x) == {"token_ids", "padding_mask"}
    assert x["token_ids"].dtype == np.int32 and x["token_ids"].shape == (4, 12)
    assert x["padding_mask"].dtype == bool and y.shape == sample_weight.shape == (4, 12)
    for i, text in enumerate(texts):
        row, mask = _expected_packed(tokenizer, text, 13)
        assert x["token_ids"][i].tolist() == row[:-1]
        assert x["padding_mask"][i].tolist() == mask[:-1]
        assert y[i].tolist() == row[1:]
        assert sample_weight[i].tolist() == mask[1:]
    # The empty string: predict <eos> after <bos>, nothing else counts.
    assert x["token_ids"][1, :2].tolist() == [BOS, EOS] and y[1, 0] == EOS
    assert sample_weight[1].tolist() == [True] + [False] * 11
    # Truncation keeps <eos> as the last label.
    assert y[2, -1] == EOS and sample_weight[2].all() and x["token_ids"][2, 0] == BOS


def test_single_string_and_flags(tokenizer):
    pre = GemmaCausalLMPreprocessor(tokenizer, sequence_length=6, add_end_token=False)
    x, y, sample_weight = _numpy(pre("hello world"))
    row, mask = _expected_packed(tokenizer, "hello world", 7, end=False)
    assert x["token_ids"].tolist() == row[:-1] and y.tolist() == row[1:]
    assert EOS not in x["token_ids"].tolist() + y.tolist()
    pre = GemmaCausalLMPreprocessor(tokenizer, sequence_length=6, add_start_token=False)
    x, _, _ = _numpy(pre(["a"]))
    assert x["token_ids"][0].tolist() == _expected_packed(tokenizer, "a", 7, start=False)[0][:-1]
    # A per-call sequence_length.
    x, y, _ = _numpy(pre(["a", "bb"], sequence_length=3))
    assert x["token_ids"].shape == y.shape == (2, 3)


def test_generate_preprocess_has_no_end_token(tokenizer, preprocessor):
    texts = ["hello world", "", "The quick brown fox jumps over the lazy dog."]
    out = _numpy(preprocessor.generate_preprocess(texts))
    assert out["token_ids"].shape == (3, 12) and out["padding_mask"].dtype == bool
    assert not (out["token_ids"] == EOS).any()
    for i, text in enumerate(texts):
        row, mask = _expected_packed(tokenizer, text, 12, end=False)
        assert out["token_ids"][i].tolist() == row
        assert out["padding_mask"][i].tolist() == mask
    one = _numpy(preprocessor.generate_preprocess("hello", sequence_length=4))
    assert one["token_ids"].tolist() == _expected_packed(tokenizer, "hello", 4, end=False)[0]


def test_generate_postprocess_strips_padding_bos_and_eos_only(tokenizer, preprocessor):
    hello = tokenizer("hello").tolist()
    token_ids = np.array(
        [
            [BOS] + hello + [106, 107, EOS, PAD, PAD, PAD],
            [BOS, 106] + hello + [107] + hello + [PAD],
        ],
        dtype="int32",
    )
    # The mask hides the last "hello" of the second row, as a generation loop does past <eos>.
    padding_mask = token_ids != PAD
    padding_mask[1, -len(hello) - 1 :] = False
    out = preprocessor.generate_postprocess({"token_ids": token_ids, "padding_mask": padding_mask})
    # The chat turn markers stay, as KerasHub keeps them (tests/test_keras_hub_usage_preprocessing
    # compares with KerasHub itself).
    expected = ["hello<start_of_turn><end_of_turn>", "<start_of_turn>hello<end_of_turn>"]
    assert out == expected
    # Backend tensors (what a model returns) and lists work as well; a single row gives a str.
    tensors = {
        "token_ids": keras.ops.convert_to_tensor(token_ids),
        "padding_mask": keras.ops.convert_to_tensor(padding_mask),
    }
    assert preprocessor.generate_postprocess(tensors) == expected
    lists = {"token_ids": token_ids.tolist(), "padding_mask": padding_mask.tolist()}
    assert preprocessor.generate_postprocess(lists) == expected
    row = {"token_ids": token_ids[0], "padding_mask": padding_mask[0]}
    assert preprocessor.generate_postprocess(row) == expected[0]


def test_round_trip_through_generation_formats(preprocessor):
    texts = [s for s in CORPUS if len(s) < 12]
    packed = preprocessor.generate_preprocess(texts, sequence_length=64)
    assert preprocessor.generate_postprocess(packed) == texts


def test_chat_prompt(tokenizer, preprocessor):
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    packed = preprocessor.generate_preprocess([prompt], sequence_length=32)
    ids = to_numpy(packed["token_ids"])[0].tolist()
    assert ids[:2] == [BOS, 106] and 107 in ids
    # Only <bos> and the padding go: the prompt comes back whole, so that chat code can find it
    # in a reply (`response.replace(prompt, "")`).
    assert preprocessor.generate_postprocess(packed) == [prompt]


def test_matches_keras_hub(sentencepiece_proto, tokenizer):
    keras_hub = pytest.importorskip("keras_hub")
    reference = keras_hub.models.GemmaCausalLMPreprocessor(
        keras_hub.models.GemmaTokenizer(proto=sentencepiece_proto), sequence_length=16
    )
    ours = GemmaCausalLMPreprocessor(tokenizer, sequence_length=16)
    for texts in (CORPUS, CORPUS[5], CORPUS[:1]):
        for method in ("__call__", "generate_preprocess"):
            out, expected = getattr(ours, method)(texts), getattr(reference, method)(texts)
            flat, flat_expected = keras.tree.flatten(out), keras.tree.flatten(expected)
            assert len(flat) == len(flat_expected) == (4 if method == "__call__" else 2)
            for a, b in zip(flat, flat_expected):
                # The same kind of tensor (the backend's), dtype, shape and values.
                assert type(a) is type(b) and str(a.dtype) == str(b.dtype)
                assert np.array_equal(to_numpy(a), to_numpy(b))


def test_tf_data_matches_eager(preprocessor):
    tf = pytest.importorskip("tensorflow")
    pytest.importorskip("tensorflow_text")
    x, y, w = _numpy(preprocessor(CORPUS))
    ds = tf.data.Dataset.from_tensor_slices(CORPUS).batch(64).map(preprocessor)
    batches = list(ds)
    assert isinstance(batches[0][0]["token_ids"], tf.Tensor)
    gx = np.concatenate([b[0]["token_ids"].numpy() for b in batches])
    gm = np.concatenate([b[0]["padding_mask"].numpy() for b in batches])
    gy = np.concatenate([b[1].numpy() for b in batches])
    gw = np.concatenate([b[2].numpy() for b in batches])
    assert np.array_equal(gx, x["token_ids"]) and np.array_equal(gm, x["padding_mask"])
    assert np.array_equal(gy, y) and np.array_equal(gw, w)
    # Unbatched elements, and generation formats, inside graphs.
    first = next(iter(tf.data.Dataset.from_tensor_slices(CORPUS).map(preprocessor)))
    assert first[0]["token_ids"].shape == (12,)
    assert np.array_equal(first[0]["token_ids"].numpy(), x["token_ids"][0])
    texts = [s for s in CORPUS if len(s) < 12]
    ds = tf.data.Dataset.from_tensor_slices(texts).batch(16)
    ds = ds.map(lambda t: preprocessor.generate_preprocess(t, sequence_length=64))
    back = [s.decode("utf-8") for b in ds.map(preprocessor.generate_postprocess) for s in b.numpy()]
    assert back == texts


@pytest.mark.parametrize("bad", [1, 0, -3, 2.5, "8", True, None])
def test_sequence_length_must_be_at_least_two(tokenizer, preprocessor, bad):
    with pytest.raises(ValueError, match="`sequence_length` must be an integer >= 2"):
        GemmaCausalLMPreprocessor(tokenizer, sequence_length=bad)
    if bad is not None:  # None means "the layer's own length" in calls
        with pytest.raises(ValueError, match="`sequence_length` must be an integer >= 2"):
            preprocessor(["a"], sequence_length=bad)
        with pytest.raises(ValueError, match="`sequence_length` must be an integer >= 2"):
            preprocessor.generate_preprocess(["a"], sequence_length=bad)


def test_bad_inputs(sentencepiece_proto, tokenizer, preprocessor):
    with pytest.raises(TypeError, match="must be a keras_gemma.GemmaTokenizer"):
        GemmaCausalLMPreprocessor("tokenizer.model")
    with pytest.raises(ValueError, match="tokenizer without `sequence_length`"):
        GemmaCausalLMPreprocessor(GemmaTokenizer(proto=sentencepiece_proto, sequence_length=4))
    with pytest.raises(TypeError, match="expects a string.*Received: int"):
        preprocessor([1, 2])
    with pytest.raises(TypeError, match="numpy array of float64"):
        preprocessor.generate_preprocess(np.zeros((2,)))
    with pytest.raises(TypeError, match="a string or a 1-D batch of strings"):
        preprocessor([["a"], ["b"]])
    with pytest.raises(TypeError, match="a dict with 'token_ids' and 'padding_mask'"):
        preprocessor.generate_postprocess(np.zeros((1, 4), "int32"))
    with pytest.raises(ValueError, match="token id 5000 is out of range"):
        preprocessor.generate_postprocess(
            {"token_ids": np.array([[2, 5000]]), "padding_mask": np.array([[True, True]])}
        )
    with pytest.warns(UserWarning, match="`y` / `sample_weight` passed in are ignored"):
        preprocessor(["a"], y=np.zeros((1, 12)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        preprocessor(["a"])


def test_config_round_trip(preprocessor):
    pre = GemmaCausalLMPreprocessor(
        preprocessor.tokenizer, sequence_length=7, add_end_token=False, name="pre"
    )
    config = json.loads(json.dumps(keras.saving.serialize_keras_object(pre)))
    assert config["registered_name"] == "keras_gemma>GemmaCausalLMPreprocessor"
    restored = keras.saving.deserialize_keras_object(config)
    assert isinstance(restored, GemmaCausalLMPreprocessor) and restored.name == "pre"
    assert isinstance(restored.tokenizer, GemmaTokenizer)
    assert restored.tokenizer.proto == pre.tokenizer.proto
    assert (restored.sequence_length, restored.add_start_token, restored.add_end_token) == (
        7,
        True,
        False,
    )
    for a, b in zip(keras.tree.flatten(restored(CORPUS)), keras.tree.flatten(pre(CORPUS))):
        assert np.array_equal(to_numpy(a), to_numpy(b))
    again = GemmaCausalLMPreprocessor.from_config(preprocessor.get_config())
    assert np.array_equal(to_numpy(again(CORPUS)[1]), to_numpy(preprocessor(CORPUS)[1]))


PAIRS = {
    "prompts": ["The quick brown fox jumped over the lazy dog", "hi", "a b"],
    "responses": ["ok", "The quick brown fox jumped over the lazy dog again", ""],
}


def test_prompts_and_responses_match_keras_hub(sentencepiece_proto, tokenizer):
    """KerasHub 0.32 takes `{"prompts", "responses"}` in its Gemma 3 preprocessor (its Gemma
    one refuses a dict); ours gives the same ids, masks, labels and weights for both."""
    keras_hub = pytest.importorskip("keras_hub")
    tf = pytest.importorskip("tensorflow")
    reference_tokenizer = keras_hub.models.Gemma3Tokenizer(
        proto=sentencepiece_proto, has_vision_tokens=False
    )
    for length in (6, 9, 24):  # trimmed in turn (an odd budget too), and all fitting
        reference = keras_hub.models.Gemma3CausalLMPreprocessor(
            tokenizer=reference_tokenizer, sequence_length=length
        )
        # A tokenizer of its own: one whose tf SentencePiece op was made inside an earlier
        # test's tf.data graph can fail in a later dataset (seen on torch; see the report).
        ours = GemmaCausalLMPreprocessor(
            GemmaTokenizer(proto=sentencepiece_proto), sequence_length=length
        )
        out, expected = ours(dict(PAIRS)), reference(dict(PAIRS))
        for a, b in zip(keras.tree.flatten(out), keras.tree.flatten(expected)):
            assert str(a.dtype) == str(b.dtype)
            np.testing.assert_array_equal(to_numpy(a), to_numpy(b))
        weights = to_numpy(out[2])
        assert weights.any() and not weights.all()
        graph = next(iter(tf.data.Dataset.from_tensor_slices(PAIRS).batch(3).map(ours)))
        for a, b in zip(keras.tree.flatten(graph), keras.tree.flatten(out)):
            np.testing.assert_array_equal(a.numpy(), to_numpy(b))
    with pytest.raises(ValueError, match='"prompts" and "responses"'):
        ours({"prompts": ["a"]})
    with pytest.raises(ValueError, match="same length"):
        ours({"prompts": ["a", "b"], "responses": ["c"]})


def test_chat_conversations_train_on_model_turns_only(tokenizer):
    preprocessor = GemmaCausalLMPreprocessor(tokenizer, sequence_length=64)
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hello world"},
        {"role": "model", "content": "The quick fox."},
        {"role": "user", "content": "a b"},
        {"role": "model", "content": "lazy dog"},
    ]
    x, y, weights = _numpy(preprocessor([chat, chat[:3]]))
    # The tokens are the chat template's text tokenized whole, between <bos> and <eos>.
    text = tokenizer.apply_chat_template(chat, add_generation_prompt=False)
    expected = [BOS] + tokenizer(text).tolist() + [EOS]
    assert x["token_ids"][0][: len(expected) - 1].tolist() == expected[:-1]
    assert y[0][: len(expected) - 1].tolist() == expected[1:]
    # The loss sees the model turns' text, their <end_of_turn>\n, and <eos> after them.
    trained = y[0][weights[0]].tolist()
    assert trained[-1] == EOS
    model_turns = "The quick fox.<end_of_turn>\nlazy dog<end_of_turn>\n"
    assert tokenizer.detokenize(trained[:-1]) == model_turns
    assert tokenizer.detokenize(y[1][weights[1]].tolist()).startswith("The quick fox.")
    with pytest.raises(ValueError, match="alternate"):
        preprocessor([[{"role": "model", "content": "hi"}]])


def test_fit_data_of_prompts_and_responses_masks_prompts(tokenizer):
    from keras_gemma.generation.training_data import preprocess_for_training

    preprocessor = GemmaCausalLMPreprocessor(tokenizer, sequence_length=16)
    data = {"prompts": np.array(PAIRS["prompts"]), "responses": PAIRS["responses"]}
    x, y, weights, _ = preprocess_for_training(preprocessor, data, None, None, None)
    assert isinstance(x["token_ids"], np.ndarray) and x["token_ids"].shape == (3, 16)
    prompt = tokenizer(PAIRS["prompts"][1]).tolist()
    # "hi": <bos> and the prompt predict nothing that counts; the response's first token does.
    assert not weights[1][: len(prompt)].any() and weights[1][len(prompt)]
