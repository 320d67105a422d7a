"""Checkpoints written by transformers load into GemmaBackbone with the same logits.

The reference is transformers itself: a tiny random Gemma, Gemma 2 or Gemma 3 model is made
here, saved with `save_pretrained`, loaded by keras_gemma, and both run the same batch.
"""

import json
import os

import keras
import numpy as np
import pytest

from keras_gemma import GemmaBackbone
from keras_gemma.checkpoints.safetensors_io import SafetensorsError

SEQUENCE_LENGTH = 11
WINDOW = 4  # shorter than the sequence, so local layers really are local


def _transformers_model(generation, num_key_value_heads):
    import torch
    import transformers

    common = dict(
        vocab_size=160,
        hidden_size=32,
        intermediate_size=48,
        num_attention_heads=4,
        num_key_value_heads=num_key_value_heads,
        head_dim=12,  # not hidden_size / num_attention_heads
        rms_norm_eps=1e-6,
    )
    if generation == "gemma":
        config = transformers.GemmaConfig(num_hidden_layers=2, **common)
        model_class = transformers.GemmaForCausalLM
    elif generation == "gemma2":
        config = transformers.Gemma2Config(
            num_hidden_layers=3,
            query_pre_attn_scalar=20,  # not head_dim
            sliding_window=WINDOW,
            attn_logit_softcapping=4.0,  # small, so the caps are exercised
            final_logit_softcapping=3.0,
            **common,
        )
        model_class = transformers.Gemma2ForCausalLM
    else:
        config = transformers.Gemma3TextConfig(
            num_hidden_layers=6,
            query_pre_attn_scalar=20,
            sliding_window=WINDOW,
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {
                    "rope_type": "linear",
                    "rope_theta": 1000000.0,
                    "factor": 8.0,
                },
            },
            **common,
        )
        model_class = transformers.Gemma3ForCausalLM
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = model_class(config).eval()
    with torch.no_grad():
        # Random norms too: freshly made Gemma norms are all zero (scale 1), which would hide
        # a wrong (1 + w) convention.
        for name, parameter in model.named_parameters():
            std = 0.3 if "norm" in name else 0.15
            parameter.normal_(0.0, std)
    return model


def _batch():
    rng = np.random.default_rng(7)
    token_ids = rng.integers(4, 160, size=(2, SEQUENCE_LENGTH)).astype("int32")
    padding_mask = np.ones_like(token_ids)
    padding_mask[1, -3:] = 0  # right padding in the second row
    token_ids[1, -3:] = 0
    return token_ids, padding_mask


def _reference_logits(model, token_ids, padding_mask):
    import torch

    with torch.no_grad():
        output = model(
            input_ids=torch.tensor(token_ids, dtype=torch.long),
            attention_mask=torch.tensor(padding_mask, dtype=torch.long),
        )
    return output.logits.float().numpy()


@pytest.fixture(scope="module", params=["gemma", "gemma2", "gemma3"])
def generation(request):
    return request.param


@pytest.fixture(scope="module", params=[1, 2], ids=["mqa", "gqa"])
def checkpoint(request, generation, tmp_path_factory):
    model = _transformers_model(generation, request.param)
    directory = tmp_path_factory.mktemp(f"{generation}_kv{request.param}")
    model.save_pretrained(directory)
    token_ids, padding_mask = _batch()
    expected = _reference_logits(model, token_ids, padding_mask)
    # transformers' own bfloat16 run calibrates what bfloat16 rounding costs on these weights.
    import torch

    reference_bfloat16 = _reference_logits(model.to(torch.bfloat16), token_ids, padding_mask)
    return str(directory), expected, reference_bfloat16


def _logits(backbone, token_ids, padding_mask):
    hidden = backbone({"token_ids": token_ids, "padding_mask": padding_mask})
    logits = backbone.token_embedding(hidden, reverse=True)
    return np.asarray(keras.ops.convert_to_numpy(keras.ops.cast(logits, "float32")))


def test_float32_logits_match_transformers(checkpoint):
    directory, expected, _ = checkpoint
    backbone = GemmaBackbone.from_preset(directory, dtype="float32")
    token_ids, padding_mask = _batch()
    actual = _logits(backbone, token_ids, padding_mask)
    present = padding_mask.astype(bool)
    assert expected[present].std() > 0.1  # the comparison is not between near-zero tensors
    np.testing.assert_allclose(actual[present], expected[present], atol=1e-4, rtol=0)


def test_bfloat16_logits_within_tolerance(checkpoint):
    # Tolerance, stated: in bfloat16 our logits may differ from the float32 reference by at
    # most 3x what transformers' own bfloat16 run differs by on the same weights (measured
    # ratio 0.9x-2.1x here; bfloat16 keeps 8 mantissa bits, and the rounding compounds over
    # layers), and the argmax agrees wherever the reference's top-2 margin is clear.
    directory, expected, reference_bfloat16 = checkpoint
    backbone = GemmaBackbone.from_preset(directory, dtype="bfloat16")
    token_ids, padding_mask = _batch()
    actual = _logits(backbone, token_ids, padding_mask)
    present = padding_mask.astype(bool)
    expected, actual = expected[present], actual[present]
    reference_error = np.abs(reference_bfloat16[present] - expected).max()
    assert 0 < reference_error < 0.1 * np.abs(expected).max()
    assert np.abs(actual - expected).max() <= 3 * reference_error
    top2 = np.sort(expected, axis=-1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 4 * reference_error
    assert clear.any()
    np.testing.assert_array_equal(actual[clear].argmax(-1), expected[clear].argmax(-1))


def test_config_translation(checkpoint, generation):
    directory, _, _ = checkpoint
    backbone = GemmaBackbone.from_preset(directory, load_weights=False)
    with open(os.path.join(directory, "config.json")) as file:
        hf_config = json.load(file)
    assert backbone.intermediate_dim == 2 * hf_config["intermediate_size"]
    assert backbone.head_dim == 12
    if generation == "gemma3":
        assert backbone.use_query_key_norm
        assert backbone.sliding_window_pattern == 6
        assert backbone.global_rope_scaling_factor == 8.0
        assert backbone.local_rope_scaling_factor == 1.0
    if generation == "gemma2":
        assert backbone.sliding_window_pattern == 2
        assert backbone.attention_logit_soft_cap == 4.0


def test_missing_tensor_is_named(checkpoint, tmp_path):
    from keras_gemma.checkpoints.safetensors_io import read_safetensors, write_safetensors

    directory, _, _ = checkpoint
    tensors = dict(read_safetensors(os.path.join(directory, "model.safetensors")))
    removed = next(name for name in tensors if "layers.0.mlp.up_proj" in name)
    del tensors[removed]
    write_safetensors(tmp_path / "model.safetensors", tensors)
    (tmp_path / "config.json").write_text(open(os.path.join(directory, "config.json")).read())
    with pytest.raises(ValueError, match="up_proj"):
        GemmaBackbone.from_preset(str(tmp_path))


def test_shape_mismatch_names_both_shapes(checkpoint, tmp_path):
    directory, _, _ = checkpoint
    config = json.load(open(os.path.join(directory, "config.json")))
    config["intermediate_size"] = 64
    (tmp_path / "config.json").write_text(json.dumps(config))
    # A hard link: a symbolic link out of the directory is refused (test_bad_presets.py).
    os.link(os.path.join(directory, "model.safetensors"), tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"tensor 'model.layers.0.mlp.gate_proj.weight' has shape "
                                         r"\(48, 32\), but config.json describes a model whose "
                                         r"'model.layers.0.mlp.gate_proj.weight' is \(64, 32\)"):
        GemmaBackbone.from_preset(str(tmp_path))


def test_truncated_safetensors_is_reported(checkpoint, tmp_path):
    directory, _, _ = checkpoint
    data = open(os.path.join(directory, "model.safetensors"), "rb").read()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "config.json").write_text(open(os.path.join(directory, "config.json")).read())
    with pytest.raises(SafetensorsError, match="truncated"):
        GemmaBackbone.from_preset(str(tmp_path))


def test_pickled_weights_are_refused(tmp_path, checkpoint):
    directory, _, _ = checkpoint
    (tmp_path / "config.json").write_text(open(os.path.join(directory, "config.json")).read())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        GemmaBackbone.from_preset(str(tmp_path))
