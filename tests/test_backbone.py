"""GemmaBackbone: configuration, saving, parameter counts, and agreement with KerasHub."""

import keras
import numpy as np
import pytest

from keras_gemma import GemmaBackbone
from keras_gemma.checkpoints.keras_hub import heads_in, heads_out
from conftest import tiny_config

TINY = tiny_config(num_layers=3, head_dim=12)
GEMMA3_SWITCHES = dict(
    query_pre_attn_scalar=20,
    use_post_attention_norm=True,
    use_post_ffw_norm=True,
    use_query_key_norm=True,
    use_sliding_window_attention=True,
    sliding_window_size=3,
    sliding_window_pattern=3,
    local_rope_max_wavelength=10000.0,
    global_rope_max_wavelength=1000000.0,
    global_rope_scaling_factor=8.0,
)


def _inputs():
    rng = np.random.default_rng(3)
    token_ids = rng.integers(0, 96, size=(2, 7)).astype("int32")
    padding_mask = np.ones_like(token_ids)
    padding_mask[0, -2:] = 0
    return {"token_ids": token_ids, "padding_mask": padding_mask}


def _numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def test_output_shape_and_logits():
    backbone = GemmaBackbone(**TINY, final_logit_soft_cap=2.0)
    hidden = backbone(_inputs())
    assert tuple(hidden.shape) == (2, 7, 32)
    logits = _numpy(backbone.token_embedding(hidden, reverse=True))
    assert logits.shape == (2, 7, 96)
    assert np.abs(logits).max() <= 2.0  # the final soft-cap holds


def test_get_config_is_the_constructor_arguments():
    arguments = {**TINY, **GEMMA3_SWITCHES, "dtype": "float32"}
    backbone = GemmaBackbone(**arguments)
    config = backbone.get_config()
    for key, value in arguments.items():
        if key != "dtype":
            assert config[key] == value, key
    rebuilt = GemmaBackbone.from_config(config)
    assert rebuilt.get_config() == config


def test_layer_pattern_and_rope():
    backbone = GemmaBackbone(**TINY, **GEMMA3_SWITCHES)
    windows = [block.sliding_window_size for block in backbone.transformer_layers]
    assert windows == [3, 3, None]  # every third layer global
    wavelengths = [block.rope_max_wavelength for block in backbone.transformer_layers]
    assert wavelengths == [10000.0, 10000.0, 1000000.0]
    factors = [block.rope_scaling_factor for block in backbone.transformer_layers]
    assert factors == [1.0, 1.0, 8.0]


def test_save_and_load_keras_file(tmp_path):
    backbone = GemmaBackbone(**TINY, **GEMMA3_SWITCHES)
    inputs = _inputs()
    expected = _numpy(backbone(inputs))
    path = str(tmp_path / "backbone.keras")
    backbone.save(path)
    restored = keras.saving.load_model(path)
    assert isinstance(restored, GemmaBackbone)
    np.testing.assert_array_equal(_numpy(restored(inputs)), expected)


@pytest.mark.parametrize(
    "switches", [{}, GEMMA3_SWITCHES, {"use_post_attention_norm": True}], ids=["gemma", "gemma3", "post-norm"]
)
def test_parameter_count_formula_matches_built_models(switches):
    backbone = GemmaBackbone(**TINY, **switches)
    assert GemmaBackbone.parameter_count(backbone.get_config()) == backbone.count_params()


def test_gemma_2b_and_7b_parameter_counts():
    # The formula is checked against built models above; the real shapes would need 34 GB.
    gemma_2b = dict(
        vocabulary_size=256000, num_layers=18, num_query_heads=8, num_key_value_heads=1,
        hidden_dim=2048, intermediate_dim=32768, head_dim=256,
    )
    gemma_7b = dict(
        vocabulary_size=256000, num_layers=28, num_query_heads=16, num_key_value_heads=16,
        hidden_dim=3072, intermediate_dim=49152, head_dim=256,
    )
    assert GemmaBackbone.parameter_count(gemma_2b) == 2_506_172_416
    assert GemmaBackbone.parameter_count(gemma_7b) == 8_537_680_896


def test_bad_arguments_are_explained():
    with pytest.raises(
        ValueError, match=r"`num_key_value_heads` must divide the number of query heads \(4\), got 3"
    ):
        GemmaBackbone(**{**TINY, "num_key_value_heads": 3})
    with pytest.raises(ValueError, match="`intermediate_dim` must be even.*got 63"):
        GemmaBackbone(**{**TINY, "intermediate_dim": 63})


def test_gemma_hidden_states_match_keras_hub():
    """KerasHub's GemmaBackbone with the same weights gives the same hidden states (Gemma 1)."""
    import keras_hub

    reference = keras_hub.models.GemmaBackbone(**TINY, dtype="float32")
    ours = GemmaBackbone(**TINY, dtype="float32")
    rng = np.random.default_rng(0)
    for variable in reference.weights:
        std = 0.3 if "norm" in variable.path else 0.15
        variable.assign(rng.normal(0, std, variable.shape).astype("float32"))
    # The same variable paths as KerasHub's (user code addresses layers by these names).
    theirs = {variable.path: variable for variable in reference.weights}
    assert sorted(theirs) == sorted(v.path for v in ours.weights)
    # KerasHub stores kernels (in, out); ours are (out, in).
    layouts = {
        "attention/query/kernel": heads_in,
        "attention/key/kernel": heads_in,
        "attention/value/kernel": heads_in,
        "attention/attention_output/kernel": heads_out,
        "ffw_gating/": np.transpose,
        "ffw_gating_2/": np.transpose,
        "ffw_linear/": np.transpose,
    }
    for variable in ours.weights:
        value = _numpy(theirs[variable.path].value)
        for suffix, transform in layouts.items():
            if suffix in variable.path and variable.path.endswith("kernel"):
                value = transform(value)
        variable.assign(value)
    inputs = _inputs()
    expected = _numpy(reference(inputs))
    actual = _numpy(ours(inputs))
    present = inputs["padding_mask"].astype(bool)
    assert expected[present].std() > 0.1
    np.testing.assert_allclose(actual[present], expected[present], atol=1e-4, rtol=0)


def test_gemma3_variable_paths_are_keras_hubs():
    """Layout maps, LoRA targets and weight surgery written for KerasHub address these paths."""
    import keras_hub

    reference = keras_hub.models.Gemma3Backbone(
        vocabulary_size=96, image_size=16, num_layers=3, num_query_heads=4,
        num_key_value_heads=2, hidden_dim=32, intermediate_dim=32, head_dim=12,
        use_post_attention_norm=True, use_post_ffw_norm=True, vision_encoder=None,
    )
    ours = GemmaBackbone(**TINY, **GEMMA3_SWITCHES)
    assert sorted(v.path for v in ours.weights) == sorted(v.path for v in reference.weights)
    block = ours.get_layer("decoder_block_1")
    assert block.gating_ffw.name == "ffw_gating" and block.ffw_linear.name == "ffw_linear"


def test_lora_on_keras_hub_layer_names():
    backbone = GemmaBackbone(**TINY)
    backbone.enable_lora(rank=2, target_layer_names=["ffw_gating", "ffw_linear"])
    trained = sorted({v.path.split("/", 1)[1] for v in backbone.trainable_variables})
    assert trained == [
        "ffw_gating/lora_kernel_a", "ffw_gating/lora_kernel_b",
        "ffw_linear/lora_kernel_a", "ffw_linear/lora_kernel_b",
    ]
