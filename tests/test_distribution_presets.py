"""Presets and int8 under keras.distribution on 8 simulated CPU devices (JAX only).

Run by `make test-distribution` (see tests/test_distribution.py for why its own process): a
preset saved from a sharded model loads on one device with identical logits and vice versa,
`from_preset` reads each weight shard by shard, and `quantize("int8")` runs sharded.
"""

import keras
import numpy as np
import pytest

if keras.backend.backend() != "jax":
    pytest.skip("keras.distribution is JAX-only in Keras 3.15.1", allow_module_level=True)

import jax  # noqa: E402

if jax.device_count() < 8:
    pytest.skip("needs 8 devices: run `make test-distribution`", allow_module_level=True)

from test_distribution import TINY, assert_sharded_as_mapped, distributed, inputs  # noqa: E402
from test_distribution import logits, model_parallel, random_weights  # noqa: E402

from keras_gemma import GemmaBackbone, GemmaCausalLM  # noqa: E402
from keras_gemma.distribution import check_layout, variable_shapes  # noqa: E402


def compiled_logits(backbone, data):
    """`logits(backbone, data)` as one jitted program: run eagerly on sharded weights, each
    op compiles on its own for 8 devices, which costs more than the test's other work."""
    variables = backbone.weights

    def run(values, data):
        with keras.StatelessScope(state_mapping=list(zip(variables, values))):
            return backbone.token_embedding(backbone(data), reverse=True)

    return np.asarray(jax.jit(run)([v.value for v in variables], data))


def one_device(config, weights):
    backbone = GemmaBackbone(**config)
    backbone.set_weights(weights)
    return backbone


def test_a_preset_saved_from_a_sharded_model_loads_on_one_device(tmp_path):
    config = TINY["gemma3"]
    weights = random_weights(GemmaBackbone(**config))
    expected = logits(one_device(config, weights), inputs())
    distribution, _ = model_parallel((2, 4))
    with distribution.scope():
        sharded = GemmaBackbone(**config)
        sharded.set_weights(weights)
        assert not sharded.token_embedding.embeddings.value.sharding.is_fully_replicated
        sharded.save_to_preset(str(tmp_path))
    loaded = GemmaBackbone.from_preset(str(tmp_path))
    assert all(len(v.value.sharding.device_set) == 1 for v in loaded.weights)
    for variable, value in zip(loaded.weights, weights):
        np.testing.assert_array_equal(np.asarray(variable.value), value, err_msg=variable.path)
    # The same weights on one device: the same program, so the same logits bit for bit.
    np.testing.assert_array_equal(logits(loaded, inputs()), expected)


def test_a_preset_saved_on_one_device_loads_shard_by_shard(tmp_path, monkeypatch):
    shape = (1, 8)
    config = TINY["gemma1_kv1"]
    weights = random_weights(GemmaBackbone(**config))
    original = one_device(config, weights)
    expected = logits(original, inputs())
    GemmaCausalLM(original, compile=False).save_to_preset(str(tmp_path))
    # Record what the loader asks the checkpoint for: shards, never a whole sharded tensor.
    requested = []
    make_array = jax.make_array_from_callback

    def spying(shape_, sharding, callback, *args, **kwargs):
        def recorded(index):
            piece = callback(index)
            requested.append((shape_, piece.shape))
            return piece

        return make_array(shape_, sharding, recorded, *args, **kwargs)

    monkeypatch.setattr(jax, "make_array_from_callback", spying)
    distribution, layout_map = model_parallel(shape)
    with distribution.scope():
        lm = GemmaCausalLM.from_preset(str(tmp_path))
        backbone = lm.backbone
        actual = compiled_logits(backbone, distributed(distribution, inputs()))
    assert assert_sharded_as_mapped(backbone, layout_map, distribution.device_mesh) > 0
    for variable, value in zip(backbone.weights, weights):
        np.testing.assert_array_equal(np.asarray(variable.value), value, err_msg=variable.path)
    np.testing.assert_allclose(actual, expected, atol=1e-5, rtol=0)
    embedding = (config["vocabulary_size"], config["hidden_dim"])
    pieces = [piece for whole, piece in requested if whole == embedding]
    # One read per device, each 1/8 of the vocabulary.
    assert pieces == [(embedding[0] // shape[1], embedding[1])] * 8


def test_int8_variables_have_layouts():
    config = TINY["gemma2"]
    distribution, layout_map = model_parallel((1, 8))
    shapes = variable_shapes(config, quantization_mode="int8")
    per_device = check_layout(shapes, layout_map)
    assert per_device < sum(int(np.prod(s)) for _, s in shapes) / 4
    backbone = GemmaBackbone(**config)
    GemmaCausalLM(backbone, compile=False).quantize("int8")
    assert [(v.path, tuple(v.shape)) for v in backbone.weights] == shapes


def test_int8_under_model_parallel_is_close_to_unsharded_int8():
    config = TINY["gemma3"]
    weights = random_weights(GemmaBackbone(**config))
    reference = one_device(config, weights)
    GemmaCausalLM(reference, compile=False).quantize("int8")
    expected = logits(reference, inputs())
    distribution, layout_map = model_parallel((2, 4))
    with distribution.scope():
        backbone = GemmaBackbone(**config)
        backbone.set_weights(weights)
        lm = GemmaCausalLM(backbone, compile=False)
        lm.quantize("int8")
        check_layout(backbone, layout_map)  # every int8 kernel and scale has a layout
        actual = compiled_logits(backbone, distributed(distribution, inputs()))
    assert assert_sharded_as_mapped(backbone, layout_map, distribution.device_mesh) > 0
    by_path = {v.path: v for v in backbone.weights}
    scale = by_path["decoder_block_0/attention/query/kernel_scale"].value
    assert scale.sharding.shard_shape(scale.shape)[-1] == config["head_dim"] // 4
    for variable in reference.weights:  # the same int8 values, quantized shard by shard
        np.testing.assert_array_equal(np.asarray(by_path[variable.path].value),
                                      np.asarray(variable.value), err_msg=variable.path)
    np.testing.assert_allclose(actual, expected, atol=1e-5, rtol=0)
