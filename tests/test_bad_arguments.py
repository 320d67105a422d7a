"""The arguments a new user gets wrong give one clear error naming the argument and the value,
and saying what to do, before anything is compiled or allocated: generate() and stream()
(max_length, prompts, stop tokens, token ids), the sampler, the preprocessor, the tokenizer
and GemmaBackbone's constructor. Files are in test_bad_files.py and test_bad_presets.py.
"""

import numpy as np
import pytest
from conftest import tiny_config

from keras_gemma import GemmaBackbone, GemmaCausalLM, GemmaCausalLMPreprocessor, GemmaTokenizer

VOCABULARY = 1000


@pytest.fixture(scope="module")
def lm(sentencepiece_proto):
    backbone = GemmaBackbone(**tiny_config(vocabulary_size=VOCABULARY), dtype="float32")
    preprocessor = GemmaCausalLMPreprocessor(GemmaTokenizer(proto=sentencepiece_proto),
                                             sequence_length=16)
    return GemmaCausalLM(backbone, preprocessor)


_MAX_LENGTH = r"`max_length` must be an integer >= 2 \(the total length in tokens, prompt " \
              r"included\), got {}. Pass e.g. max_length=64"


@pytest.mark.parametrize("max_length", [0, -1, 1, 16.0, "16", True],
                         ids=["zero", "negative", "one", "float", "string", "bool"])
def test_generate_max_length(lm, max_length):
    # max_length=0 used to fail on the preprocessor's `sequence_length`, never passed by the
    # caller; without a preprocessor it returned an empty array.
    message = "generate\\(\\): " + _MAX_LENGTH.format(repr(max_length))
    with pytest.raises(ValueError, match=message):
        lm.generate("Hello", max_length=max_length)
    ids = {"token_ids": np.ones((1, 8), "int32"), "padding_mask": np.ones((1, 8), bool)}
    with pytest.raises(ValueError, match=message):
        lm.generate(ids, max_length=max_length, stop_token_ids=None)


def test_stream_max_length(lm):
    with pytest.raises(ValueError, match="stream\\(\\): " + _MAX_LENGTH.format(0)):
        list(lm.stream("Hello", max_length=0))


@pytest.mark.parametrize(
    "prompts, error, message",
    [
        (123, TypeError, r"the prompt must be a string or a list of strings, got int \(123\)"),
        (None, TypeError, r"the prompt must be a string or a list of strings, got NoneType"),
        (["a", 3], TypeError, r"prompt 1 of the batch is int \(3\); every prompt in a batch must "
                              r"be a string. Convert it with str\(\)"),
        ([["a"]], TypeError, r"prompt 0 of the batch is list \(\['a'\]\)"),
        ([], ValueError, r"got an empty list of prompts; pass at least one string"),
    ],
    ids=["int", "none", "mixed_batch", "nested_list", "empty_list"],
)
def test_generate_prompts(lm, prompts, error, message):
    with pytest.raises(error, match="generate\\(\\): " + message):
        lm.generate(prompts, max_length=8)


def test_stream_takes_one_string(lm):
    with pytest.raises(TypeError, match=r"stream\(\) takes one prompt string; got list. For a "
                                        r"batch, call generate\(\)"):
        list(lm.stream(["a", "b"], max_length=8))


@pytest.mark.parametrize(
    "stop_token_ids, error, message",
    [
        ("eos", TypeError, r"`stop_token_ids` got 'eos'. Pass \"auto\""),
        ([-5], ValueError, r"`stop_token_ids` holds -5, which is not a token id of this model "
                           r"\(integers 0 to 999\)"),
        ([VOCABULARY], ValueError, r"`stop_token_ids` holds 1000, which is not a token id"),
    ],
    ids=["a_string", "negative", "past_the_vocabulary"],
)
def test_generate_stop_token_ids(lm, stop_token_ids, error, message):
    with pytest.raises(error, match="generate\\(\\): " + message):
        lm.generate("Hello", max_length=8, stop_token_ids=stop_token_ids)


@pytest.mark.parametrize("bad_id", [VOCABULARY + 4000, -3], ids=["past_vocabulary", "negative"])
def test_generate_token_ids_outside_the_vocabulary(lm, bad_id):
    # The embedding lookup would clamp them and generate from the wrong token, silently.
    ids = {"token_ids": np.full((1, 8), bad_id, "int32"), "padding_mask": np.ones((1, 8), bool)}
    with pytest.raises(ValueError, match=rf"generate\(\): token_ids holds {bad_id}, outside this "
                                         r"model's vocabulary \(ids 0 to 999\). Tokenize with "
                                         r"this model's tokenizer"):
        lm.generate(ids, max_length=10, stop_token_ids=None)


def test_generate_token_ids_and_mask_of_different_shapes(lm):
    ids = {"token_ids": np.ones((1, 8), "int32"), "padding_mask": np.ones((1, 7), bool)}
    with pytest.raises(ValueError, match=r"token_ids has shape \(1, 8\) and padding_mask \(1, 7\)"
                                         r"; they must be the same"):
        lm.generate(ids, max_length=10, stop_token_ids=None)


def test_unknown_sampler_name(lm):
    with pytest.raises(ValueError, match=r"Unknown sampler 'gredy'; expected one of \['beam', "
                                         r"'contrastive', 'greedy', 'random', 'top_k', 'top_p'\]"):
        lm.compile(sampler="gredy")


@pytest.mark.parametrize("sequence_length", [0, "8"], ids=["zero", "string"])
def test_preprocessor_sequence_length(lm, sequence_length):
    with pytest.raises(ValueError, match=rf"`sequence_length` must be an integer >= 2. Received: "
                                         rf"{sequence_length!r}. Pass e.g. sequence_length=512"):
        GemmaCausalLMPreprocessor(lm.preprocessor.tokenizer, sequence_length=sequence_length)


def test_tokenizer_lone_surrogate(lm):
    with pytest.raises(ValueError, match=r"string 1 holds the lone surrogate '\\ud800' at position "
                                         r"2, which is not a character.*Clean the text first"):
        lm.preprocessor.tokenizer(["fine", "ab\ud800c"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"num_layers": -1}, r"`num_layers` must be a positive integer, got -1"),
        ({"num_layers": "2"}, r"`num_layers` must be a positive integer, got '2'"),
        ({"hidden_dim": 0}, r"`hidden_dim` must be a positive integer, got 0"),
        ({"dropout": 1.5}, r"`dropout` must be a number in \[0, 1\), got 1.5"),
        ({"head_dim": 7}, r"`head_dim` must be even for rotary embeddings, got 7"),
        ({"layer_norm_epsilon": 0}, r"`layer_norm_epsilon` must be a positive number, got 0"),
    ],
    ids=["negative_layers", "string_layers", "zero_hidden", "dropout_past_one", "odd_head_dim",
         "zero_epsilon"],
)
def test_backbone_constructor(overrides, message):
    # A negative layer count used to fail inside a norm layer with a NotImplementedError.
    with pytest.raises(ValueError, match=rf"GemmaBackbone: {message}. Pass a valid"):
        GemmaBackbone(**tiny_config(**overrides))
