"""Presets written by KerasHub itself load in keras_gemma with the same outputs."""

import keras
import numpy as np
import pytest

from keras_gemma import GemmaBackbone

from keras_hub_models import TINY
from keras_hub_models import keras_hub_causal_lm
from keras_hub_models import keras_hub_backbone as _keras_hub_backbone
from keras_hub_models import randomize as _randomize


def _inputs():
    rng = np.random.default_rng(5)
    token_ids = rng.integers(4, 120, size=(2, 9)).astype("int32")
    padding_mask = np.ones_like(token_ids)
    padding_mask[1, -2:] = 0
    return {"token_ids": token_ids, "padding_mask": padding_mask}


def _numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(keras.ops.cast(x, "float32")))


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


@pytest.mark.parametrize("generation", ["gemma", "gemma3"])
def test_keras_hub_causal_lm_preset_gives_same_logits_and_greedy_text(
    generation, sentencepiece_proto, tmp_path
):
    from keras_gemma import GemmaCausalLM

    reference = keras_hub_causal_lm(generation, sentencepiece_proto)
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
