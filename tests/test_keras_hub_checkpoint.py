"""Presets written by KerasHub itself load in keras_gemma with the same outputs."""

import keras
import numpy as np
import pytest

from keras_gemma import GemmaBackbone

TINY = dict(
    vocabulary_size=1000,
    num_layers=3,
    num_query_heads=4,
    num_key_value_heads=2,
    hidden_dim=32,
    intermediate_dim=64,
    head_dim=12,
)


def _randomize(model, seed=0):
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        std = 0.3 if "norm" in variable.path else 0.15
        variable.assign(rng.normal(0, std, variable.shape).astype(variable.dtype))


def _inputs():
    rng = np.random.default_rng(5)
    token_ids = rng.integers(4, 120, size=(2, 9)).astype("int32")
    padding_mask = np.ones_like(token_ids)
    padding_mask[1, -2:] = 0
    return {"token_ids": token_ids, "padding_mask": padding_mask}


def _numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(keras.ops.cast(x, "float32")))


def _keras_hub_backbone(generation):
    import keras_hub

    if generation == "gemma":
        return keras_hub.models.GemmaBackbone(**TINY, dtype="float32")
    if generation == "gemma2":
        return keras_hub.models.GemmaBackbone(
            **TINY,
            use_post_ffw_norm=True,
            use_post_attention_norm=True,
            attention_logit_soft_cap=4.0,
            final_logit_soft_cap=3.0,
            use_sliding_window_attention=True,
            sliding_window_size=4,
            dtype="float32",
        )
    # KerasHub's Gemma 3 counts intermediate_dim as the FFN width; 7 layers cover one
    # global layer (the 6th) and a local one after it.
    arguments = {**TINY, "intermediate_dim": 32, "num_layers": 7}
    return keras_hub.models.Gemma3Backbone(
        **arguments,
        image_size=16,
        vision_encoder=None,
        use_query_key_norm=True,
        use_post_ffw_norm=True,
        use_post_attention_norm=True,
        use_sliding_window_attention=True,
        sliding_window_size=4,
        dtype="float32",
    )


@pytest.mark.parametrize("generation", ["gemma", "gemma2", "gemma3"])
def test_keras_hub_backbone_preset_loads_with_same_logits(generation, tmp_path):
    reference = _keras_hub_backbone(generation)
    _randomize(reference)
    reference.save_to_preset(str(tmp_path))
    inputs = _inputs()
    expected_hidden = reference(inputs)
    expected = _numpy(reference.token_embedding(expected_hidden, reverse=True))

    ours = GemmaBackbone.from_preset(str(tmp_path))
    actual = _numpy(ours.token_embedding(ours(inputs), reverse=True))
    present = inputs["padding_mask"].astype(bool)
    assert expected[present].std() > 0.1
    np.testing.assert_allclose(actual[present], expected[present], atol=1e-4, rtol=0)


def test_keras_hub_bfloat16_weights_load(tmp_path):
    import keras_hub

    reference = keras_hub.models.GemmaBackbone(**TINY, dtype="bfloat16")
    _randomize(reference)
    reference.save_to_preset(str(tmp_path))
    ours = GemmaBackbone.from_preset(str(tmp_path), dtype="float32")
    expected = _numpy(reference.token_embedding.embeddings)
    np.testing.assert_array_equal(_numpy(ours.token_embedding.embeddings), expected)


def test_keras_hub_config_with_unknown_key_is_refused(tmp_path):
    import json

    import keras_hub

    keras_hub.models.GemmaBackbone(**TINY).save_to_preset(str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    config["config"]["mystery_switch"] = True
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="mystery_switch"):
        GemmaBackbone.from_preset(str(tmp_path))


def test_foreign_class_is_refused_and_never_imported(tmp_path):
    import json
    import sys

    config = {
        "module": "evil_module_that_must_not_be_imported",
        "class_name": "Evil",
        "config": {},
        "registered_name": "evil>Evil",
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="not one of keras_gemma's Gemma formats"):
        GemmaBackbone.from_preset(str(tmp_path))
    assert "evil_module_that_must_not_be_imported" not in sys.modules


def _keras_hub_causal_lm(generation, proto):
    import keras_hub

    backbone = _keras_hub_backbone(generation)
    if generation == "gemma3":
        tokenizer = keras_hub.models.Gemma3Tokenizer(proto=proto, has_vision_tokens=False)
        preprocessor = keras_hub.models.Gemma3CausalLMPreprocessor(
            tokenizer=tokenizer, sequence_length=24
        )
        return keras_hub.models.Gemma3CausalLM(backbone=backbone, preprocessor=preprocessor)
    tokenizer = keras_hub.models.GemmaTokenizer(proto=proto)
    preprocessor = keras_hub.models.GemmaCausalLMPreprocessor(
        tokenizer=tokenizer, sequence_length=24
    )
    return keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=preprocessor)


@pytest.mark.parametrize("generation", ["gemma", "gemma3"])
def test_keras_hub_causal_lm_preset_gives_same_logits_and_greedy_text(
    generation, sentencepiece_proto, tmp_path
):
    from keras_gemma import GemmaCausalLM

    reference = _keras_hub_causal_lm(generation, sentencepiece_proto)
    _randomize(reference.backbone, seed=1)
    reference.compile(sampler="greedy")
    reference.save_to_preset(str(tmp_path))

    ours = GemmaCausalLM.from_preset(str(tmp_path))
    assert ours.preprocessor.sequence_length == 24
    prompts = ["The quick brown fox", "hello"]
    expected_text = reference.generate(prompts, max_length=20, stop_token_ids=None)
    actual_text = ours.generate(prompts, max_length=20, stop_token_ids=None)
    assert actual_text == list(expected_text)

    inputs = _inputs()
    inputs["token_ids"] = inputs["token_ids"] % ours.backbone.vocabulary_size
    expected = _numpy(reference.backbone.token_embedding(reference.backbone(inputs), reverse=True))
    actual = _numpy(ours(inputs))
    present = inputs["padding_mask"].astype(bool)
    np.testing.assert_allclose(actual[present], expected[present], atol=1e-4, rtol=0)
