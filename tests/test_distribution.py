"""Sharding with keras.distribution on 8 simulated CPU devices (JAX only).

XLA fixes the number of host devices when JAX starts, so these tests need their own
process: `make test-distribution` runs

    XLA_FLAGS=--xla_force_host_platform_device_count=8 KERAS_BACKEND=jax pytest tests/test_distribution.py

and `make test` runs that target too. In the ordinary per-backend runs (one device, or a
backend without keras.distribution) the module skips itself.
"""

import contextlib
import math
import re

import keras
import numpy as np
import pytest

if keras.backend.backend() != "jax":
    pytest.skip("keras.distribution is JAX-only in Keras 3.15.1", allow_module_level=True)

import jax  # noqa: E402

if jax.device_count() < 8:
    pytest.skip(
        "needs 8 devices: `make test-distribution` sets "
        "XLA_FLAGS=--xla_force_host_platform_device_count=8 before JAX starts",
        allow_module_level=True,
    )

import keras_gemma  # noqa: E402
from keras_gemma import GemmaBackbone  # noqa: E402
from keras_gemma import GemmaCausalLM  # noqa: E402
from keras_gemma.distribution import LORA_TARGETS  # noqa: E402
from keras_gemma.distribution import check_layout  # noqa: E402
from keras_gemma.distribution import variable_shapes  # noqa: E402
from keras.distribution import DataParallel, DeviceMesh, ModelParallel  # noqa: E402

# head_dim 16, FFN width 32, vocabulary 64, hidden 32: every sharded axis divides by 8.
_BASE = dict(vocabulary_size=64, num_layers=2, num_query_heads=4, hidden_dim=32,
             intermediate_dim=64, head_dim=16)
TINY = {
    "gemma1_kv1": dict(_BASE, num_key_value_heads=1),
    "gemma1_kv4": dict(_BASE, num_key_value_heads=4),
    "gemma2": dict(
        _BASE, num_key_value_heads=2, query_pre_attn_scalar=24, use_post_attention_norm=True,
        use_post_ffw_norm=True, attention_logit_soft_cap=50.0, final_logit_soft_cap=30.0,
        use_sliding_window_attention=True, sliding_window_size=4, sliding_window_pattern=2,
    ),
    "gemma3": dict(
        _BASE, num_key_value_heads=2, query_pre_attn_scalar=16, use_post_attention_norm=True,
        use_post_ffw_norm=True, use_query_key_norm=True, use_sliding_window_attention=True,
        sliding_window_size=4, sliding_window_pattern=2, local_rope_max_wavelength=10000.0,
        global_rope_max_wavelength=1000000.0, global_rope_scaling_factor=8.0,
    ),
}
MESHES = [(1, 8), (2, 4), (8, 1)]
BATCH, LENGTH = 8, 10  # batch 8 so that an (8, 1) mesh splits it; 10 > the window of 4


def mesh(shape):
    return DeviceMesh(shape, ("batch", "model"), jax.devices()[: math.prod(shape)])


def model_parallel(shape):
    """`(distribution, layout_map)` for a ("batch", "model") mesh of `shape`."""
    layout_map = GemmaBackbone.get_layout_map(mesh(shape))
    return ModelParallel(layout_map=layout_map, batch_dim_name="batch"), layout_map


def random_weights(backbone, seed=0):
    """Weights with every norm scale and LoRA factor non-zero, so that each one matters."""
    rng = np.random.default_rng(seed)
    return [rng.normal(0.0, 0.2, v.shape).astype("float32") for v in backbone.weights]


def inputs(seed=1):
    rng = np.random.default_rng(seed)
    mask = np.ones((BATCH, LENGTH), "int32")
    mask[1, 7:] = 0  # right padding on two rows
    mask[5, 4:] = 0
    return {
        "token_ids": rng.integers(0, _BASE["vocabulary_size"], (BATCH, LENGTH)).astype("int32"),
        "padding_mask": mask,
    }


def logits(backbone, data):
    hidden = backbone(data)
    return np.asarray(backbone.token_embedding(hidden, reverse=True))


def distributed(distribution, data):
    """`data` placed along the batch axis, as fit/predict place it."""
    return {
        key: jax.device_put(value, distribution.get_data_layout(value.shape).backend_layout)
        for key, value in data.items()
    }


def expected_spec(layout_axes, ndim):
    return tuple(layout_axes) + (None,) * (ndim - len(layout_axes))


def assert_sharded_as_mapped(backbone, layout_map, device_mesh):
    sizes = dict(zip(device_mesh.axis_names, device_mesh.shape))
    sharded = 0
    for variable in backbone.weights:
        axes = tuple(layout_map[variable.path].axes)
        sharding = variable.value.sharding
        spec = tuple(sharding.spec) + (None,) * (len(variable.shape) - len(sharding.spec))
        assert spec == expected_spec(axes, len(variable.shape)), variable.path
        shard_shape = tuple(
            size // (sizes[axis] if axis else 1) for size, axis in zip(variable.shape, axes)
        )
        assert sharding.shard_shape(tuple(variable.shape)) == shard_shape, variable.path
        assert variable.value.addressable_shards[0].data.shape == shard_shape, variable.path
        sharded += shard_shape != tuple(variable.shape)
    return sharded


# The map against every shipped architecture, abstractly (nothing the size of a preset is built).


@pytest.mark.parametrize("name", sorted(TINY))
def test_variable_shapes_are_the_built_weights(name):
    backbone = GemmaBackbone(**TINY[name])
    backbone.enable_lora(2, target_layer_names=LORA_TARGETS)
    built = [(v.path, tuple(v.shape)) for v in backbone.weights]
    assert variable_shapes(TINY[name], 2, LORA_TARGETS) == built


def test_every_entry_matches_every_preset_and_every_weight_matches_one_entry():
    layout_map = GemmaBackbone.get_layout_map(mesh((1, 8)))
    for preset in keras_gemma.list_presets():
        config = GemmaBackbone.presets[preset]["backbone"]
        paths = [path for path, _ in variable_shapes(config, 4, LORA_TARGETS)]
        paths += [p for p, _ in variable_shapes(config, quantization_mode="int8")
                  if p.endswith("_scale")]
        for key in layout_map:
            assert any(re.fullmatch(key, path) for path in paths), (preset, key)
        for path in paths:
            assert sum(bool(re.fullmatch(key, path)) for key in layout_map) == 1, (preset, path)


@pytest.mark.parametrize("shape", MESHES + [(1, 2), (1, 4), (4, 2)])
def test_every_preset_divides(shape):
    device_mesh = mesh(shape)
    layout_map = GemmaBackbone.get_layout_map(device_mesh)
    for preset in keras_gemma.list_presets():
        config = GemmaBackbone.presets[preset]["backbone"]
        total = GemmaBackbone.parameter_count(config)
        # LoRA on every projection must divide as well.
        check_layout(variable_shapes(config, 4, LORA_TARGETS), layout_map)
        check_layout(variable_shapes(config, quantization_mode="int8"), layout_map)
        per_device = check_layout(preset, layout_map)
        assert per_device < total or shape[1] == 1, preset


def test_a_mesh_that_does_not_divide_names_the_variable_shape_and_mesh():
    device_mesh = mesh((1, 8))
    layout_map = GemmaBackbone.get_layout_map(device_mesh)
    config = dict(TINY["gemma1_kv1"], head_dim=12)
    with pytest.raises(ValueError) as error:
        check_layout(config, layout_map)
    message = str(error.value)
    assert "decoder_block_0/attention/query/kernel" in message
    assert "(4, 12, 32)" in message and "shape=(1, 8)" in message and "12" in message
    with pytest.raises(ValueError, match=r"token_embedding/embeddings of shape \(100, 32\)"):
        check_layout(dict(TINY["gemma1_kv1"], vocabulary_size=100), layout_map)
    # A built model is checked through its weights; (2, 4) divides head_dim 12.
    backbone = GemmaBackbone(**config)
    check_layout(backbone, GemmaBackbone.get_layout_map(mesh((2, 4))))
    with pytest.raises(ValueError, match=r"query/kernel of shape \(4, 12, 32\)"):
        check_layout(backbone, layout_map)
    # A weight that no entry matches would be replicated without a word.
    with pytest.raises(ValueError, match="matches no entry"):
        check_layout(backbone, keras.distribution.LayoutMap(device_mesh))
    with pytest.raises(ValueError, match="'tensor' is not an axis"):
        GemmaBackbone.get_layout_map(device_mesh, model_parallel_dim_name="tensor")


@pytest.mark.parametrize("preset", ["gemma_7b_en", "gemma2_9b_en"])
def test_bytes_per_device_of_large_presets_on_one_by_eight(preset):
    device_mesh = mesh((1, 8))
    layout_map = GemmaBackbone.get_layout_map(device_mesh)
    sizes = dict(zip(device_mesh.axis_names, device_mesh.shape))
    total = per_device = replicated = 0
    for path, shape in variable_shapes(GemmaBackbone.presets[preset]["backbone"]):
        count = math.prod(shape)
        shards = math.prod(sizes[a] for a in layout_map[path].axes if a is not None)
        total += count
        per_device += count // shards
        if shards == 1:
            replicated += count
            assert path.endswith("norm/scale") or path.endswith("normalization/scale"), path
    assert per_device == check_layout(preset, layout_map)
    assert per_device <= total / 8 + replicated
    bytes_per_parameter = 2  # bfloat16
    print(
        f"\n{preset} on a (1, 8) mesh: {total * bytes_per_parameter / 2**30:.2f} GiB of "
        f"bfloat16 weights in all, {per_device * bytes_per_parameter / 2**30:.3f} GiB per "
        f"device (1/8 is {total * bytes_per_parameter / 8 / 2**30:.3f} GiB; replicated norms "
        f"{replicated} parameters)"
    )


# Numerics: tiny models of each generation, unsharded against sharded.


@pytest.fixture(scope="module")
def references():
    """Per tiny model: (weights, unsharded logits), built once on one device."""
    built = {}
    data = inputs()
    for name, config in TINY.items():
        backbone = GemmaBackbone(**config)
        weights = random_weights(backbone)
        backbone.set_weights(weights)
        built[name] = (weights, logits(backbone, data))
    return built


@pytest.mark.parametrize("name", sorted(TINY))
@pytest.mark.parametrize("shape", MESHES + ["data_parallel"])
def test_logits_equal_unsharded(references, name, shape):
    if shape == "data_parallel":
        distribution, layout_map = DataParallel(devices=jax.devices()[:8]), None
    else:
        distribution, layout_map = model_parallel(shape)
    weights, expected = references[name]
    with distribution.scope():
        backbone = GemmaBackbone(**TINY[name])
        backbone.set_weights(weights)
        actual = logits(backbone, distributed(distribution, inputs()))
    if shape == "data_parallel":
        assert all(v.value.sharding.is_fully_replicated for v in backbone.weights)
    else:
        sharded = assert_sharded_as_mapped(backbone, layout_map, distribution.device_mesh)
        # head_dim, FFN and vocabulary kernels: 5 per layer and the embedding.
        assert sharded == (0 if shape[1] == 1 else 7 * TINY[name]["num_layers"] + 1)
    assert np.abs(expected).max() > 1.0  # the comparison is not between near-zeros
    np.testing.assert_allclose(actual, expected, atol=1e-5, rtol=0)


def test_shardings_follow_the_map_with_lora():
    distribution, layout_map = model_parallel((2, 4))
    with distribution.scope():
        backbone = GemmaBackbone(**TINY["gemma3"])
        backbone.enable_lora(2, target_layer_names=LORA_TARGETS)
    sharded = assert_sharded_as_mapped(backbone, layout_map, distribution.device_mesh)
    by_name = {v.path: v for v in backbone.weights}
    query_a = by_name["decoder_block_0/attention/query/lora_kernel_a"].value
    assert query_a.sharding.shard_shape(query_a.shape) == (4, 4, 2)  # head_dim 16 / 4
    linear_b = by_name["decoder_block_1/ffw_linear/lora_kernel_b"].value
    assert linear_b.sharding.shard_shape(linear_b.shape) == (2, 8)  # width 32 / 4
    # 7 kernels + 7 LoRA factors per layer, and the embedding.
    assert sharded == 14 * 2 + 1


# One fit step, sharded against unsharded.


def _fit_once(distribution, config, weights, lora_weights=None):
    with distribution.scope() if distribution is not None else contextlib.nullcontext():
        backbone = GemmaBackbone(**config)
        backbone.set_weights(weights)
        if lora_weights is not None:
            backbone.enable_lora(2)
            lora = [v for v in backbone.weights if "lora_kernel" in v.path]
            for variable, value in zip(lora, lora_weights):
                variable.assign(value)
        lm = GemmaCausalLM(backbone, compile=False)
        lm.compile(
            # Momentum gives the optimizer a variable per weight, whose layout is checked.
            optimizer=keras.optimizers.SGD(learning_rate=0.5, momentum=0.9),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            weighted_metrics=[],
        )
        data = inputs(seed=3)
        labels = np.roll(data["token_ids"], -1, axis=1)
        history = lm.fit(
            data, labels, sample_weight=data["padding_mask"], batch_size=BATCH, epochs=1,
            shuffle=False, verbose=0,
        )
        if distribution is not None:
            momentums = lm.optimizer.momentums
            assert len(momentums) == len(lm.trainable_variables) > 0
            for variable, momentum in zip(lm.trainable_variables, momentums):
                assert momentum.value.sharding == variable.value.sharding, variable.path
            assert any(not v.value.sharding.is_fully_replicated for v in momentums)
        return history.history["loss"][0], {v.path: np.asarray(v.value) for v in lm.weights}


@pytest.mark.parametrize("with_lora", [False, True], ids=["full", "lora"])
def test_one_fit_step_equals_unsharded(with_lora):
    config = TINY["gemma2"]
    backbone = GemmaBackbone(**config)
    weights = random_weights(backbone)
    lora_weights = None
    if with_lora:
        backbone.enable_lora(2)
        rng = np.random.default_rng(7)
        lora_weights = [
            rng.normal(0.0, 0.3, v.shape).astype("float32")
            for v in backbone.weights if "lora_kernel" in v.path
        ]
    loss, updated = _fit_once(None, config, weights, lora_weights)
    distribution, _ = model_parallel((2, 4))
    sharded_loss, sharded_updated = _fit_once(distribution, config, weights, lora_weights)
    np.testing.assert_allclose(sharded_loss, loss, atol=1e-5, rtol=0)
    assert sorted(sharded_updated) == sorted(updated)
    initial = dict(zip([p for p, _ in variable_shapes(config)], weights))
    moved = 0
    for path, value in updated.items():
        np.testing.assert_allclose(sharded_updated[path], value, atol=1e-5, rtol=0, err_msg=path)
        if path in initial:
            changed = not np.allclose(value, initial[path], atol=1e-6)
            assert not (with_lora and changed), f"{path} is frozen under LoRA but moved"
            moved += changed
    if with_lora:
        lora_paths = [p for p, _ in variable_shapes(config, 2) if "lora_kernel" in p]
        for path, start in zip(lora_paths, lora_weights):
            assert not np.allclose(updated[path], start, atol=1e-6), f"{path} did not move"
    else:
        assert moved == len(initial)  # every weight, the norms included, was trained
