"""keras_gemma's own preset directory: exact round trips, atomic saves, clear refusals."""

import json
import os

import keras
import numpy as np
import pytest

from keras_gemma import GemmaBackbone
from keras_gemma.checkpoints import preset_format
from keras_gemma.checkpoints.safetensors_io import SafetensorsError
from conftest import tiny_config

TINY = tiny_config(
    vocabulary_size=64,
    num_query_heads=2,
    num_key_value_heads=1,
    hidden_dim=16,
    intermediate_dim=32,
    use_query_key_norm=True,
    use_post_attention_norm=True,
    use_post_ffw_norm=True,
)


def _inputs():
    return {
        "token_ids": np.array([[2, 5, 9, 11, 3]], dtype="int32"),
        "padding_mask": np.ones((1, 5), dtype="int32"),
    }


def _numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(keras.ops.cast(x, "float32")))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_save_then_load_is_exact(tmp_path, dtype):
    backbone = GemmaBackbone(**TINY, dtype=dtype)
    backbone.save_to_preset(tmp_path / "preset")
    restored = GemmaBackbone.from_preset(str(tmp_path / "preset"))
    assert restored.get_config() == backbone.get_config()
    for original, loaded in zip(backbone.weights, restored.weights):
        assert original.path == loaded.path
        np.testing.assert_array_equal(_numpy(loaded), _numpy(original))
    np.testing.assert_array_equal(_numpy(restored(_inputs())), _numpy(backbone(_inputs())))


def test_dtype_on_load(tmp_path):
    GemmaBackbone(**TINY, dtype="bfloat16").save_to_preset(tmp_path / "preset")
    restored = GemmaBackbone.from_preset(str(tmp_path / "preset"), dtype="float32")
    assert restored.token_embedding.embeddings.dtype == "float32"


def test_interrupted_save_leaves_nothing(tmp_path, monkeypatch):
    backbone = GemmaBackbone(**TINY)

    def explode(*args, **kwargs):
        raise KeyboardInterrupt("interrupted mid-save")

    monkeypatch.setattr(preset_format, "write_safetensors", explode)
    with pytest.raises(KeyboardInterrupt):
        backbone.save_to_preset(tmp_path / "preset")
    assert os.listdir(tmp_path) == []


def test_interrupted_overwrite_keeps_the_old_preset(tmp_path, monkeypatch):
    old = GemmaBackbone(**TINY)
    old.save_to_preset(tmp_path / "preset")
    before = sorted(os.listdir(tmp_path / "preset"))
    monkeypatch.setattr(preset_format, "write_safetensors", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        GemmaBackbone(**TINY).save_to_preset(tmp_path / "preset")
    assert os.listdir(tmp_path) == ["preset"]
    assert sorted(os.listdir(tmp_path / "preset")) == before
    restored = GemmaBackbone.from_preset(str(tmp_path / "preset"))
    np.testing.assert_array_equal(_numpy(restored(_inputs())), _numpy(old(_inputs())))


def test_refuses_to_overwrite_a_directory_that_is_not_a_preset(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a preset"):
        GemmaBackbone(**TINY).save_to_preset(tmp_path)


def _edit_config(tmp_path, edit):
    GemmaBackbone(**TINY).save_to_preset(tmp_path / "preset")
    path = tmp_path / "preset" / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))
    return str(tmp_path / "preset")


def test_unknown_config_key(tmp_path):
    preset = _edit_config(tmp_path, lambda c: c["backbone"]["config"].update(num_experts=4))
    with pytest.raises(ValueError, match="unknown backbone arguments.*num_experts"):
        GemmaBackbone.from_preset(preset)


def test_wrong_config_type(tmp_path):
    preset = _edit_config(tmp_path, lambda c: c["backbone"]["config"].update(num_layers="2"))
    with pytest.raises(ValueError, match="'num_layers' must be a positive integer"):
        GemmaBackbone.from_preset(preset)


def test_older_format_is_refused(tmp_path):
    # Format 1 stored dense kernels (in, out): read as format 2 they would be wrong or,
    # for square kernels, silently transposed.
    preset = _edit_config(tmp_path, lambda c: c.update(keras_gemma_format=1))
    with pytest.raises(ValueError, match=r"keras_gemma format 1.*reads formats \[2, 3\]"):
        GemmaBackbone.from_preset(preset)


def test_newer_format_asks_for_an_upgrade(tmp_path):
    preset = _edit_config(tmp_path, lambda c: c.update(keras_gemma_format=99))
    with pytest.raises(ValueError, match="format 99.*upgrade keras_gemma"):
        GemmaBackbone.from_preset(preset)


def test_format_2_presets_still_load(tmp_path):
    """Format 2 named the feed-forward projections feed_forward/gate|up|down."""
    from keras_gemma.checkpoints.safetensors_io import read_safetensors, write_safetensors

    backbone = GemmaBackbone(**TINY)
    rng = np.random.default_rng(3)
    for variable in backbone.weights:
        variable.assign(rng.normal(0, 0.2, variable.shape).astype("float32"))
    backbone.save_to_preset(tmp_path / "preset")
    weights_path = str(tmp_path / "preset" / "model.safetensors")
    old_names = {
        "/ffw_gating_2/": "/feed_forward/up/",
        "/ffw_gating/": "/feed_forward/gate/",
        "/ffw_linear/": "/feed_forward/down/",
    }
    tensors = {}
    for name, value in read_safetensors(weights_path).items():
        for new, old in old_names.items():
            name = name.replace(new, old)
        tensors[name] = value
    assert sum("/feed_forward/" in name for name in tensors) == 3 * TINY["num_layers"]
    os.remove(weights_path)
    write_safetensors(weights_path, tensors)
    config_path = tmp_path / "preset" / "config.json"
    config = json.loads(config_path.read_text())
    config["keras_gemma_format"] = 2
    config_path.write_text(json.dumps(config))

    restored = GemmaBackbone.from_preset(str(tmp_path / "preset"))
    np.testing.assert_array_equal(_numpy(restored(_inputs())), _numpy(backbone(_inputs())))


def test_foreign_class_is_refused(tmp_path):
    preset = _edit_config(
        tmp_path, lambda c: c["backbone"].update(class_name="os.system")
    )
    with pytest.raises(ValueError, match="refusing to load"):
        GemmaBackbone.from_preset(preset)


def test_truncated_weights(tmp_path):
    GemmaBackbone(**TINY).save_to_preset(tmp_path / "preset")
    weights = tmp_path / "preset" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100])
    with pytest.raises(SafetensorsError, match="truncated"):
        GemmaBackbone.from_preset(str(tmp_path / "preset"))


def test_missing_weights_file(tmp_path):
    GemmaBackbone(**TINY).save_to_preset(tmp_path / "preset")
    os.remove(tmp_path / "preset" / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        GemmaBackbone.from_preset(str(tmp_path / "preset"))


def test_shape_mismatch_names_variable_and_shapes(tmp_path):
    preset = _edit_config(tmp_path, lambda c: c["backbone"]["config"].update(hidden_dim=24))
    with pytest.raises(ValueError, match=r"token_embedding/embeddings.*\(64, 16\).*\(64, 24\)"):
        GemmaBackbone.from_preset(preset)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_lora_model_saves_with_its_update_merged(tmp_path, dtype):
    backbone = GemmaBackbone(**TINY, dtype=dtype)
    backbone.enable_lora(rank=2)
    rng = np.random.default_rng(7)
    for variable in backbone.trainable_variables:  # lora_kernel_b starts at zero
        variable.assign(rng.normal(0, 0.3, variable.shape).astype("float32"))
    expected = _numpy(backbone(_inputs()))
    backbone.save_to_preset(tmp_path / "preset")
    restored = GemmaBackbone.from_preset(str(tmp_path / "preset"))
    assert not any("lora" in v.path for v in restored.weights)
    np.testing.assert_allclose(
        _numpy(restored(_inputs())), expected, atol=1e-5 if dtype == "float32" else 0.05, rtol=0
    )
