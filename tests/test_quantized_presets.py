"""Quantized presets: saved and loaded as int8/int4, and float presets quantized while loading.

The reference for quantizing while loading is the ordinary way: load in float, then
`quantize(mode)`. Both must give the same variables, value for value.
"""

import json
import os

import keras
import numpy as np
import pytest

from conftest import tiny_config, to_numpy
from keras_gemma import GemmaBackbone
from keras_gemma import GemmaCausalLM
from keras_gemma.checkpoints import quantized_loading

_INPUTS = {"token_ids": np.array([[2, 5, 7, 9, 11]]), "padding_mask": np.ones((1, 5), "int32")}


def _variables(backbone):
    return {v.path: (keras.backend.standardize_dtype(v.dtype), to_numpy(v)) for v in backbone.weights}


def _assert_same_variables(expected, actual):
    expected, actual = _variables(expected), _variables(actual)
    assert sorted(expected) == sorted(actual)
    for path, (dtype, value) in expected.items():
        assert actual[path][0] == dtype, path
        np.testing.assert_array_equal(actual[path][1], value, err_msg=path)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantizing_while_loading_equals_quantizing_after(tiny_preset, mode):
    reference = GemmaCausalLM.from_preset(tiny_preset)
    reference.quantize(mode)
    loaded = GemmaCausalLM.from_preset(tiny_preset, quantize=mode)
    _assert_same_variables(reference.backbone, loaded.backbone)
    # No layer `quantize` touches was ever built in float.
    kernels = [v for v in loaded.backbone.weights if v.path.endswith(("/kernel", "/embeddings"))]
    assert kernels and all(keras.backend.standardize_dtype(v.dtype) == "int8" for v in kernels)
    prompt = "the quick brown"
    assert loaded.generate(prompt, max_length=12) == reference.generate(prompt, max_length=12)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_a_quantized_model_saves_and_loads_without_requantizing(tiny_preset, tmp_path, mode):
    lm = GemmaCausalLM.from_preset(tiny_preset)
    lm.quantize(mode)
    lm.save_to_preset(str(tmp_path / "quantized"))
    with open(tmp_path / "quantized" / "config.json") as file:
        saved_dtype = json.load(file)["backbone"]["config"]["dtype"]
    assert saved_dtype["class_name"] == "DTypePolicyMap"

    def never(*args, **kwargs):
        raise AssertionError("a quantized preset was quantized again while loading")

    original = quantized_loading.fill
    quantized_loading.fill = never
    try:
        loaded = GemmaCausalLM.from_preset(str(tmp_path / "quantized"))
    finally:
        quantized_loading.fill = original
    _assert_same_variables(lm.backbone, loaded.backbone)
    np.testing.assert_array_equal(to_numpy(loaded.backbone(_INPUTS)), to_numpy(lm.backbone(_INPUTS)))
    # The int8 file is smaller than the float one it came from.
    size = os.path.getsize(tmp_path / "quantized" / "model.safetensors")
    assert size < 0.6 * os.path.getsize(os.path.join(tiny_preset, "model.safetensors"))


def test_a_partly_quantized_model_keeps_its_float_layers(tiny_preset, tmp_path):
    lm = GemmaCausalLM.from_preset(tiny_preset)
    lm.backbone.transformer_layers[0].attention.query_dense.quantize("int8")
    lm.save_to_preset(str(tmp_path / "partly"))
    loaded = GemmaCausalLM.from_preset(str(tmp_path / "partly"))
    _assert_same_variables(lm.backbone, loaded.backbone)
    modes = {layer.path: layer.quantization_mode for layer in loaded.backbone._flatten_layers()}
    assert modes["decoder_block_0/attention/query"] == "int8"
    assert modes["decoder_block_0/attention/key"] is None
    assert modes["token_embedding"] is None


def test_quantize_arguments_are_checked(tiny_preset, tmp_path):
    with pytest.raises(ValueError, match="int8"):
        GemmaBackbone.from_preset(tiny_preset, quantize="int3")
    lm = GemmaCausalLM.from_preset(tiny_preset, quantize="int8")
    lm.save_to_preset(str(tmp_path / "quantized"))
    with pytest.raises(ValueError, match="quantized model already"):
        GemmaBackbone.from_preset(str(tmp_path / "quantized"), quantize="int8")


def test_a_config_naming_another_policy_class_is_refused(tiny_preset, tmp_path):
    lm = GemmaCausalLM.from_preset(tiny_preset, quantize="int8")
    lm.save_to_preset(str(tmp_path / "hostile"))
    path = tmp_path / "hostile" / "config.json"
    config = json.loads(path.read_text())
    policies = config["backbone"]["config"]["dtype"]["config"]["policy_map"]
    policies["token_embedding"] = {
        "module": "os", "class_name": "system", "config": {"command": "true"},
        "registered_name": None,
    }
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="dtype"):
        GemmaBackbone.from_preset(str(tmp_path / "hostile"))


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_an_embedding_quantized_in_blocks_equals_one_quantized_whole(mode):
    reference = GemmaBackbone(**tiny_config())
    table = to_numpy(reference.token_embedding.embeddings)
    reference.quantize(mode)
    policy_map = quantized_loading.quantized_policy_map(GemmaBackbone, tiny_config(), mode)
    built = GemmaBackbone(**{**tiny_config(), "dtype": policy_map})
    # 96 rows in blocks of 7: the last block is short.
    quantized_loading.fill(
        built.token_embedding, lambda start, stop: table[start:stop], rows=len(table),
        rows_per_chunk=7,
    )
    for expected, actual in zip(reference.token_embedding.weights, built.token_embedding.weights):
        assert expected.path == actual.path
        np.testing.assert_array_equal(to_numpy(actual), to_numpy(expected), err_msg=expected.path)


@pytest.mark.parametrize("mode,dtype", [("int8", "float32"), ("int4", "float32"),
                                        ("int8", "bfloat16")])
def test_kernels_quantized_in_blocks_of_rows_equal_ones_quantized_whole(mode, dtype):
    """Loading quantizes each kernel a block of its first (output) axis at a time; the
    variables equal `quantize(mode)` of the whole float model, for every kind of kernel
    (query/key/value [heads, head_dim, hidden], output [hidden, heads, head_dim], FFN), also
    in a bfloat16 model (whose scales numpy holds as ml_dtypes' bfloat16)."""
    config = tiny_config(dtype=dtype)
    reference = GemmaBackbone(**config)
    kernels = {layer.path: to_numpy(layer._kernel) for layer in reference._flatten_layers()
               if hasattr(layer, "equation")}
    reference.quantize(mode)
    policy_map = quantized_loading.quantized_policy_map(GemmaBackbone, config, mode)
    built = GemmaBackbone(**{**config, "dtype": policy_map})
    expected = {layer.path: layer for layer in reference._flatten_layers()}
    filled = 0
    for layer in built._flatten_layers():
        if layer.path not in kernels or layer.quantization_mode is None:
            continue
        kernel = kernels[layer.path]
        # Blocks of 2 rows (int4 packs pairs of rows): 4 query heads make 2 blocks.
        quantized_loading.fill(
            layer, lambda start, stop: kernel[start:stop], rows=len(kernel), rows_per_chunk=2
        )
        filled += 1
        for want, got in zip(expected[layer.path].weights, layer.weights):
            assert want.path == got.path
            np.testing.assert_array_equal(to_numpy(got), to_numpy(want), err_msg=want.path)
    assert filled == 7 * tiny_config()["num_layers"]
