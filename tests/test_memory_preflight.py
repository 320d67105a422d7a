"""The memory preflight of from_preset and quantize: a load that cannot fit is refused with the
figures and the ways out before anything is built; the estimate matches what is built."""

import functools
import json
import math
import os

import keras
import numpy as np
import pytest
from conftest import tiny_config
from test_memory_available import fake_cgroup_v2

from keras_gemma import GemmaBackbone, GemmaCausalLM
from keras_gemma.checkpoints import memory_available, memory_preflight
from keras_gemma.checkpoints.memory_preflight import load_estimate, weight_bytes, weight_table

GB = 10**9
GEMMA_2B = dict(vocabulary_size=256000, num_layers=18, num_query_heads=8, num_key_value_heads=1,
                hidden_dim=2048, intermediate_dim=32768, head_dim=256)


@pytest.fixture
def low_memory(monkeypatch, tmp_path):
    """This process may take 4 GB more: a cgroup v2 limit of 6 GB with 2 GB in use."""
    monkeypatch.delenv(memory_preflight.SKIP_VARIABLE, raising=False)
    root = fake_cgroup_v2(tmp_path / "root", limit=6 * GB, used=2 * GB)
    monkeypatch.setattr(memory_preflight, "available_memory",
                        functools.partial(memory_available.available_memory, root=root))


@pytest.fixture
def nothing_built(monkeypatch):
    """Fails the test if a backbone is built or a weight read."""
    from keras_gemma.checkpoints import gguf, loader

    def refuse(*arguments, **keywords):
        raise AssertionError("the preflight let the load start")

    monkeypatch.setattr(GemmaBackbone, "from_gemma_arguments", classmethod(refuse))
    monkeypatch.setattr(loader, "load_weights", refuse)
    monkeypatch.setattr(gguf, "convert", refuse)


def _write_json(path, value):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as file:
        json.dump(value, file)


def _keras_gemma_dir(directory):
    _write_json(os.path.join(directory, "config.json"), {
        "keras_gemma_format": 3, "metadata": {},
        "backbone": {"class_name": "GemmaBackbone", "config": {**GEMMA_2B, "dtype": "bfloat16"}},
    })


def _keras_hub_dir(directory):
    _write_json(os.path.join(directory, "config.json"), {
        "module": "keras_hub.src.models.gemma.gemma_backbone", "class_name": "GemmaBackbone",
        "registered_name": "keras_hub>GemmaBackbone",
        "config": {**GEMMA_2B, "layer_norm_epsilon": 1e-6, "dropout": 0, "name": "gemma_backbone",
                   "trainable": True, "dtype": "bfloat16"},
    })


def _transformers_dir(directory):
    _write_json(os.path.join(directory, "config.json"), {
        "model_type": "gemma", "architectures": ["GemmaForCausalLM"], "vocab_size": 256000,
        "hidden_size": 2048, "intermediate_size": 16384, "num_hidden_layers": 18,
        "num_attention_heads": 8, "num_key_value_heads": 1, "head_dim": 256,
        "rms_norm_eps": 1e-6, "hidden_activation": "gelu_pytorch_tanh", "torch_dtype": "bfloat16",
    })


def _gguf_file(directory):
    """A Gemma GGUF header with the 2B shape and a small embedding (the vocabulary size is
    its rows): enough for the preflight, which reads no other tensor."""
    import gguf

    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "gemma-2b.gguf")
    writer = gguf.GGUFWriter(path, "gemma")
    writer.add_block_count(GEMMA_2B["num_layers"])
    writer.add_embedding_length(GEMMA_2B["hidden_dim"])
    writer.add_feed_forward_length(GEMMA_2B["intermediate_dim"] // 2)
    writer.add_head_count(GEMMA_2B["num_query_heads"])
    writer.add_head_count_kv(GEMMA_2B["num_key_value_heads"])
    writer.add_key_length(GEMMA_2B["head_dim"])
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_tensor("token_embd.weight", np.zeros((1024, GEMMA_2B["hidden_dim"]), np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


CHECKPOINTS = {"keras_gemma": _keras_gemma_dir, "keras_hub": _keras_hub_dir,
               "transformers": _transformers_dir, "gguf": _gguf_file}


@pytest.mark.parametrize("kind", sorted(CHECKPOINTS))
def test_a_load_that_cannot_fit_is_refused_before_anything_is_built(
        kind, tmp_path, monkeypatch, low_memory, nothing_built):
    monkeypatch.setenv("KERAS_GEMMA_CACHE", str(tmp_path / "cache"))
    handle = CHECKPOINTS[kind](str(tmp_path / kind)) or str(tmp_path / kind)
    with pytest.raises(MemoryError) as caught:
        GemmaCausalLM.from_preset(handle, dtype="float32")
    message = str(caught.value)
    # The figures: what the load needs, what the process may take and where the limit is.
    assert f"from_preset({handle!r}, dtype='float32')" in message
    assert "needs about" in message and "can take only 4.0 GB more" in message
    assert "cgroup v2 limit" in message and "memory.max = 6.0 GB" in message
    # The ways out, each with its own estimate where there is one.
    assert 'dtype="bfloat16" (about' in message
    assert 'quantize="int8" (about' in message
    assert "a smaller preset" in message and "more memory" in message
    assert "check_memory=False" in message and "KERAS_GEMMA_SKIP_MEMORY_CHECK=1" in message
    if kind == "gguf":  # refused before converting it (`nothing_built` watches)
        assert "converted to float32" in message


def test_quantizing_while_loading_is_checked_too(tmp_path, monkeypatch, low_memory, nothing_built):
    _keras_gemma_dir(str(tmp_path))
    estimate = load_estimate(GEMMA_2B, "bfloat16", quantize="int8")
    assert estimate.total > 3.5 * GB  # int8 2B: 2.5 GB of weights + the loader's working set
    monkeypatch.setattr(memory_preflight, "available_memory",
                        lambda root="/": memory_available.Headroom(int(3.5 * GB), "a test"))
    with pytest.raises(MemoryError, match=r"quantize='int8'.*int8 weights quantized while"):
        GemmaBackbone.from_preset(str(tmp_path), quantize="int8")
    # int4 needs less (1.7 GB of weights): with that much left the load starts.
    int4 = load_estimate(GEMMA_2B, "bfloat16", quantize="int4").total
    assert int4 < estimate.total
    monkeypatch.setattr(memory_preflight, "available_memory",
                        lambda root="/": memory_available.Headroom(int4 + 10**8, "a test"))
    with pytest.raises(AssertionError, match="let the load start"):
        GemmaBackbone.from_preset(str(tmp_path), quantize="int4")


def test_the_argument_and_the_environment_variable_skip_the_check(
        tiny_preset, monkeypatch, low_memory):
    monkeypatch.setattr(memory_preflight, "available_memory",
                        lambda root="/": memory_available.Headroom(1000, "a test"))
    with pytest.raises(MemoryError, match="only 0.0 GB more \\(a test\\)"):
        GemmaBackbone.from_preset(tiny_preset)
    assert GemmaBackbone.from_preset(tiny_preset, check_memory=False).count_params() > 0
    monkeypatch.setenv(memory_preflight.SKIP_VARIABLE, "1")
    assert GemmaBackbone.from_preset(tiny_preset).count_params() > 0


def test_quantize_is_refused_before_any_layer_changes(monkeypatch):
    monkeypatch.delenv(memory_preflight.SKIP_VARIABLE, raising=False)
    backbone = GemmaBackbone(**tiny_config(), dtype="float32")
    monkeypatch.setattr(memory_preflight, "available_memory",
                        lambda root="/": memory_available.Headroom(1000, "a test"))
    with pytest.raises(MemoryError, match=r"quantize\('int8'\) needs about .*from_preset"):
        backbone.quantize("int8")
    assert not any(layer.quantization_mode for layer in backbone._flatten_layers())
    backbone.quantize("int8", check_memory=False)
    assert backbone.token_embedding.quantization_mode == "int8"


CONFIGS = {
    "gemma": tiny_config(),
    "gemma2": tiny_config(use_post_attention_norm=True, use_post_ffw_norm=True, num_layers=3),
    "gemma3": tiny_config(use_post_attention_norm=True, use_post_ffw_norm=True,
                          use_query_key_norm=True, num_query_heads=6, num_key_value_heads=3,
                          head_dim=12, vocabulary_size=200),
}


def _built_bytes(backbone):
    return sum(
        math.prod(v.shape) * np.dtype(keras.backend.standardize_dtype(v.dtype).replace(
            "bfloat16", "float16")).itemsize
        for v in backbone.weights
    )


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_the_weight_table_is_the_models(family):
    config = CONFIGS[family]
    assert sum(math.prod(s) for s, _ in weight_table(config)) == GemmaBackbone.parameter_count(
        config)
    backbone = GemmaBackbone(**config, dtype="float32")
    assert sorted(math.prod(v.shape) for v in backbone.weights) == sorted(
        math.prod(s) for s, _ in weight_table(config))


@pytest.mark.parametrize("dtype, mode", [("float32", None), ("bfloat16", None),
                                         ("float32", "int8"), ("bfloat16", "int4")])
def test_the_estimated_weights_are_the_bytes_of_the_built_model(dtype, mode):
    config = CONFIGS["gemma3"]
    backbone = GemmaBackbone(**config, dtype=dtype)
    if mode:
        backbone.quantize(mode, check_memory=False)
    assert weight_bytes(config, dtype, mode) == _built_bytes(backbone)


def test_the_estimate_is_sane_on_a_tiny_model_and_orders_the_ways_out():
    config = CONFIGS["gemma3"]
    float32 = load_estimate(config, "float32")
    # A tiny model's load is the backend's runtime and the weights with one copy in transit.
    largest = max(math.prod(s) for s, _ in weight_table(config))
    assert float32.weights == 4 * GemmaBackbone.parameter_count(config)
    assert 4 * largest <= float32.working_set - memory_preflight.RUNTIME_BYTES <= 8 * largest
    # The 2B shape: the figures measured by benchmarks/load_memory.py, within 15%.
    measured = {("float32", None): 12.49e9, ("bfloat16", None): 7.36e9,
                ("bfloat16", "int8"): 3.45e9, ("bfloat16", "int4"): 3.13e9}
    for (dtype, mode), peak in measured.items():
        assert 0.85 < load_estimate(GEMMA_2B, dtype, quantize=mode).total / peak < 1.15
    estimates = [load_estimate(GEMMA_2B, *case).total for case in
                 (("float32",), ("bfloat16",), ("bfloat16", "keras_gemma", "int8"),
                  ("bfloat16", "keras_gemma", "int4"))]
    assert estimates == sorted(estimates, reverse=True)
    # A GGUF file's first load converts it in float32: that is what it needs at its peak.
    gguf = load_estimate(GEMMA_2B, "bfloat16", "gguf", file_bytes=int(1.6e9))
    assert gguf.total > 2 * weight_bytes(GEMMA_2B, "float32")
