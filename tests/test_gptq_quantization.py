"""`quantize("gptq", config=keras.quantizers.GPTQConfig(...))` on a model
(keras_gemma/gptq_quantization.py): which layers get which format, that calibration helps
where plain rounding does not, saving and loading, and the refusals. The real Gemma 3 270M's
perplexity is in tests/test_real_gemma3_270m_quantized.py."""

import keras
import numpy as np
import pytest

from conftest import to_numpy
from keras_gemma import GemmaCausalLM
from keras_gemma.layers import gptq


@pytest.fixture(scope="module")
def float_lm(tiny_preset):
    """One float model for the tests that must leave it unchanged."""
    return GemmaCausalLM.from_preset(tiny_preset)


def _calibration_text():
    rng = np.random.default_rng(0)
    words = ["the", "a", "model", "reads", "text", "and", "writes", "tokens", "of", "it"]
    return [" ".join(rng.choice(words, 60)) for _ in range(4)]


def _config(lm, **overrides):
    arguments = dict(
        dataset=_calibration_text(), tokenizer=lm.preprocessor.tokenizer,
        group_size=8, sequence_length=32,
    )
    arguments.update(overrides)
    return keras.quantizers.GPTQConfig(**arguments)


def _hidden(lm, ids):
    ids = np.asarray(ids, "int32")[None]
    return to_numpy(lm.backbone({"token_ids": ids, "padding_mask": np.ones_like(ids)}))


def _calibration_ids(lm):
    return [int(i) for i in to_numpy(lm.preprocessor.tokenizer.tokenize(_calibration_text()[0]))]


def test_layers_get_the_documented_formats(tiny_preset):
    lm = GemmaCausalLM.from_preset(tiny_preset)
    lm.quantize("gptq", config=_config(lm))
    modes = {layer.name: layer.quantization_mode for layer in lm.backbone._flatten_layers()
             if getattr(layer, "quantization_mode", None)}
    assert modes == {
        "token_embedding": "int8", "query": "int4", "key": "int4", "value": "int8",
        "attention_output": "int4", "ffw_gating": "int4", "ffw_gating_2": "int4",
        "ffw_linear": "int8",
    }
    query = lm.backbone.transformer_layers[0].attention.query_dense
    assert query._int4_block_size == 8
    assert query._input_observer is None  # calibration's observers are gone


@pytest.mark.parametrize("activation_order", [False, True])
def test_calibration_beats_plain_rounding_on_calibration_text(
    tiny_preset, monkeypatch, activation_order
):
    # The same formats with GPTQ's error feedback switched off (each group rounded on the
    # same searched grid): calibrated weights must move the hidden states less.
    lm = GemmaCausalLM.from_preset(tiny_preset)
    ids = _calibration_ids(lm)
    reference = _hidden(lm, ids)
    orders = []
    with_feedback = gptq.gptq_int4

    def recording(weights, hessian, **options):
        orders.append(options["activation_order"])
        return with_feedback(weights, hessian, **options)

    monkeypatch.setattr(gptq, "gptq_int4", recording)
    lm.quantize("gptq", config=_config(lm, activation_order=activation_order))
    assert orders and set(orders) == {activation_order}  # the config's order reaches GPTQ
    calibrated = np.mean(np.square(_hidden(lm, ids) - reference))

    def without_feedback(weights, hessian, **options):
        options.update(damping=0.0)
        return with_feedback(weights, np.diag(np.diag(hessian)), **options)

    monkeypatch.setattr(gptq, "gptq_int4", without_feedback)
    plain_lm = GemmaCausalLM.from_preset(tiny_preset)
    plain_lm.quantize("gptq", config=_config(plain_lm))
    plain = np.mean(np.square(_hidden(plain_lm, ids) - reference))
    print(f"hidden-state MSE on calibration text: GPTQ {calibrated:.3g}, rounding {plain:.3g}")
    assert calibrated < 0.8 * plain


def test_saved_and_loaded_without_requantizing(tiny_preset, tmp_path):
    lm = GemmaCausalLM.from_preset(tiny_preset)
    lm.quantize("gptq", config=_config(lm))
    ids = _calibration_ids(lm)[:16]
    before = _hidden(lm, ids)
    lm.save_to_preset(str(tmp_path / "gptq"))
    loaded = GemmaCausalLM.from_preset(str(tmp_path / "gptq"))
    assert loaded.backbone.transformer_layers[1].gating_ffw.quantization_mode == "int4"
    np.testing.assert_array_equal(_hidden(loaded, ids), before)


def test_token_id_dataset_and_filters(tiny_preset):
    lm = GemmaCausalLM.from_preset(tiny_preset)
    rows = [np.arange(3, 40), np.arange(50, 90)]
    lm.backbone.quantize(
        "gptq", config=_config(lm, dataset=rows, tokenizer=None),
        filters=lambda layer: "decoder_block_0" in layer.path,
    )
    assert lm.backbone.transformer_layers[0].attention.query_dense.quantization_mode == "int4"
    assert lm.backbone.transformer_layers[1].attention.query_dense.quantization_mode is None
    assert lm.backbone.token_embedding.quantization_mode is None


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(weight_bits=8), "writes int4 weights; got GPTQConfig\\(weight_bits=8\\)"),
        (dict(tokenizer=None), "holds strings but `tokenizer` is None"),
        (dict(dataset="one string"), "must be a list of strings or of token id arrays"),
        (dict(group_size=7), "groups of 7 inputs do not divide"),
        (dict(dataset=[np.array([1, 2, 5000])], tokenizer=None), "outside this model's vocab"),
    ],
)
def test_bad_configs_are_refused(float_lm, overrides, message):
    with pytest.raises(ValueError, match=message):
        float_lm.quantize("gptq", config=_config(float_lm, **overrides))
    # Refused before any layer changed.
    assert not any(getattr(layer, "quantization_mode", None)
                   for layer in float_lm.backbone._flatten_layers())


def test_gptq_without_config_and_awq_are_refused(float_lm):
    lm = float_lm
    with pytest.raises(ValueError, match="GPTQConfig"):  # Keras' own check
        lm.quantize("gptq")
    with pytest.raises(ValueError, match="does not implement quantize\\('awq'\\)"):
        lm.quantize("awq", config=keras.quantizers.AWQConfig(
            dataset=_calibration_text(), tokenizer=lm.preprocessor.tokenizer))


def test_a_sixth_of_the_blocks_at_each_end_stay_int8():
    from conftest import assign_random_weights
    from conftest import tiny_config

    from keras_gemma import GemmaBackbone
    from keras_gemma.gptq_quantization import int8_edge_blocks

    assert [int8_edge_blocks(n) for n in (2, 6, 18, 26)] == [0, 1, 3, 4]
    backbone = GemmaBackbone(**tiny_config(num_layers=6))
    assign_random_weights(backbone)
    rows = [np.arange(3, 40), np.arange(50, 90)]
    backbone.quantize("gptq", config=keras.quantizers.GPTQConfig(
        dataset=rows, tokenizer=None, group_size=8, sequence_length=32))
    modes = [block.attention.query_dense.quantization_mode for block in backbone.transformer_layers]
    assert modes == ["int8", "int4", "int4", "int4", "int4", "int8"]
    gating = [block.gating_ffw.quantization_mode for block in backbone.transformer_layers]
    assert gating == modes
    # Blocks of one configuration but other variables: generate runs each block with its
    # own (a block-by-block program traced for an int4 block refused an int8 one), and
    # decodes what the one-loop program decodes.
    from keras_gemma.generation.generator import Generator

    lm = GemmaCausalLM(backbone)
    ids = np.zeros((2, 16), "int32")
    ids[:, :4] = [[2, 40, 41, 42], [2, 7, 8, 9]]
    prompt = {"token_ids": ids, "padding_mask": np.arange(16)[None] < 4}
    output = lm.generate(prompt, stop_token_ids=None)["token_ids"]
    steps = lm.generator._steps_from_python()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Generator, "_steps_from_python", lambda self: not steps)
        lm.generator.reset()
        np.testing.assert_array_equal(lm.generate(prompt, stop_token_ids=None)["token_ids"],
                                      output)
