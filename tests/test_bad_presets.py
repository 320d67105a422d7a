"""Bad preset directories and handles give one clear error before a model is built: config.json
with wrong types or out-of-range values, a tensor of the wrong shape, handles that climb out
of the download cache, links and shard indexes that point out of the preset directory, and
dtype policies naming code outside Keras. Each message names the file entry or argument and
the value, and says what to do. Weight and tokenizer files are in test_bad_files.py.
"""

import json
import os
import re

import numpy as np
import pytest
from conftest import tiny_config

from keras_gemma import GemmaBackbone
from keras_gemma.checkpoints.huggingface import transformers_weight_table
from keras_gemma.checkpoints.preset_files import check_links_inside
from keras_gemma.checkpoints.safetensors_io import write_safetensors

_TRANSFORMERS_CONFIG = dict(
    model_type="gemma", vocab_size=96, hidden_size=32, intermediate_size=32,
    num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_hidden_layers=2,
)
FIX_ENTRY = "Fix that entry (or download the checkpoint again)."


@pytest.fixture(scope="module")
def transformers_tensors():
    """The tensors of a tiny Gemma in transformers' names and layout."""
    backbone = GemmaBackbone(**tiny_config(), dtype="float32")
    return {name: np.asarray(to_theirs(np.asarray(variable.numpy())))
            for variable, name, _, to_theirs in transformers_weight_table(backbone)}


def _transformers_directory(path, tensors, **overrides):
    path.mkdir()
    (path / "config.json").write_text(json.dumps({**_TRANSFORMERS_CONFIG, **overrides}))
    write_safetensors(str(path / "model.safetensors"), tensors)
    return str(path)


def test_the_good_directory_loads(tmp_path, transformers_tensors):
    # The control: each test below changes one thing of this directory.
    directory = _transformers_directory(tmp_path / "good", transformers_tensors)
    assert GemmaBackbone.from_preset(directory).num_layers == 2


def test_tensor_of_the_wrong_shape_is_named(tmp_path, transformers_tensors):
    name = "model.layers.0.self_attn.q_proj.weight"
    tensors = {**transformers_tensors, name: np.zeros((30, 32), "float32")}
    directory = _transformers_directory(tmp_path / "bad", tensors)
    with pytest.raises(ValueError, match=rf"tensor '{name}' has shape \(30, 32\), but config.json "
                                         rf"describes a model whose '{name}' is \(32, 32\). Is "
                                         r"config.json the right one for these weights?"):
        GemmaBackbone.from_preset(directory)


def test_transposed_tensor_of_the_same_size_is_not_loaded_scrambled(tmp_path):
    # (hidden, heads * head_dim) where (heads * head_dim, hidden) belongs: a reshape would
    # take it silently. 4 heads of 12 make the two orders differ.
    backbone = GemmaBackbone(**tiny_config(head_dim=12), dtype="float32")
    tensors = {name: np.asarray(to_theirs(np.asarray(variable.numpy())))
               for variable, name, _, to_theirs in transformers_weight_table(backbone)}
    name = "model.layers.1.self_attn.o_proj.weight"
    tensors[name] = np.ascontiguousarray(tensors[name].T)
    directory = _transformers_directory(tmp_path / "bad", tensors, head_dim=12)
    with pytest.raises(ValueError, match=rf"tensor '{name}' has shape \(48, 32\), but config.json "
                                         rf"describes a model whose '{name}' is \(32, 48\)"):
        GemmaBackbone.from_preset(directory)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"hidden_size": "thirty-two"}, r"`hidden_size` must be an integer, got 'thirty-two' "
                                        r"\(str\)"),
        ({"num_hidden_layers": -1}, r"`num_hidden_layers` \(GemmaBackbone's `num_layers`\) must "
                                    r"be a positive integer, got -1"),
        ({"num_hidden_layers": 0}, r"`num_hidden_layers` \(GemmaBackbone's `num_layers`\) must "
                                   r"be a positive integer, got 0"),
        ({"num_key_value_heads": 3}, r"`num_key_value_heads` must divide the number of query "
                                     r"heads \(4\), got 3"),
        ({"vocab_size": 96.5}, r"`vocab_size` must be an integer, got 96.5 \(float\)"),
        ({"num_hidden_layers": True}, r"`num_hidden_layers` must be an integer, got True \(bool\)"),
        ({"vocab_size": 10**12}, r"`vocab_size` \(GemmaBackbone's `vocabulary_size`\) is larger "
                                 r"than any Gemma's \(at most 4194304\), got 1000000000000"),
        ({"rms_norm_eps": -1e-6}, r"`rms_norm_eps` \(GemmaBackbone's `layer_norm_epsilon`\) must "
                                  r"be a positive number, got -1e-06"),
        ({"rope_theta": "10k"}, r"`rope_theta` must be a number, got '10k' \(str\)"),
        ({"model_type": "gemma2", "sliding_window": "4"}, r"`sliding_window` must be an integer, "
                                                         r"got '4' \(str\)"),
    ],
    ids=["string_for_int", "negative_layers", "zero_layers", "heads_not_dividing", "float_for_int",
         "bool_for_int", "absurd_vocabulary", "negative_epsilon", "string_for_float",
         "string_window"],
)
def test_transformers_config_with_wrong_values(tmp_path, transformers_tensors, overrides, message):
    directory = _transformers_directory(tmp_path / "bad", transformers_tensors, **overrides)
    with pytest.raises(ValueError, match=message) as error:
        GemmaBackbone.from_preset(directory)
    assert os.path.join(directory, "config.json") in str(error.value)
    assert FIX_ENTRY in str(error.value) or "Grouped-query attention" in str(error.value)


def test_transformers_config_missing_a_key(tmp_path, transformers_tensors):
    directory = _transformers_directory(tmp_path / "bad", transformers_tensors)
    config = json.loads((tmp_path / "bad" / "config.json").read_text())
    del config["num_attention_heads"]
    (tmp_path / "bad" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config.json lacks the key 'num_attention_heads', which "
                                         r"every Gemma checkpoint has. Download the checkpoint"):
        GemmaBackbone.from_preset(directory)


@pytest.mark.parametrize(
    "content, message",
    [
        ("[1, 2, 3]", r"must hold a JSON object of settings, got a JSON list"),
        ('{"model_type": "gemma", ', r"is not valid JSON \(.*\). The file is corrupt or cut "
                                     r"short: download or write it again"),
    ],
    ids=["a_list", "not_json"],
)
def test_config_json_that_is_not_a_config(tmp_path, content, message):
    (tmp_path / "config.json").write_text(content)
    with pytest.raises(ValueError, match=message):
        GemmaBackbone.from_preset(str(tmp_path))


def _keras_gemma_preset(path, **backbone_overrides):
    path.mkdir()
    backbone = {"class_name": "GemmaBackbone", "config": {**tiny_config(), **backbone_overrides}}
    config = {"keras_gemma_format": 3, "backbone": backbone, "metadata": {}}
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


@pytest.mark.parametrize(
    "dtype",
    [
        {"module": "os", "class_name": "system", "config": {"command": "touch owned"}},
        {"module": "keras", "class_name": "DTypePolicyMap", "config": {
            "default_policy": "float32",
            "policy_map": {"x": {"module": "subprocess", "class_name": "Popen", "config": {}}}}},
        {"module": "keras", "class_name": "DTypePolicy", "registered_name": "evil>Policy",
         "config": {"name": "float32"}},
    ],
    ids=["module_os", "inside_a_policy_map", "registered_name"],
)
def test_dtype_policy_naming_code_outside_keras_is_refused(tmp_path, dtype):
    preset = _keras_gemma_preset(tmp_path / "preset", dtype=dtype)
    with pytest.raises(ValueError, match=r"the backbone's dtype must be a dtype name or one of "
                                         r"Keras' dtype policies .*; got .*Write it as a name "
                                         r"such as \"float32\""):
        GemmaBackbone.from_preset(preset)
    assert not (tmp_path / "owned").exists()


def test_keras_gemma_config_with_heads_not_dividing(tmp_path):
    preset = _keras_gemma_preset(tmp_path / "preset", num_query_heads=4, num_key_value_heads=3)
    with pytest.raises(ValueError, match=r"preset/config.json: `num_key_value_heads` must divide "
                                         r"the number of query heads \(4\), got 3"):
        GemmaBackbone.from_preset(preset)


@pytest.mark.parametrize(
    "handle, problem",
    [
        ("kaggle://keras/../../../etc/passwd", "a '..' or '.' path segment"),
        ("kaggle:///etc/gemma/keras/x/1", "an absolute path"),
        ("kaggle://~/gemma/keras/x/1", "an absolute path"),
        ("hf://../../etc", "a '..' or '.' path segment"),
        ("hf:///root/.ssh", "an absolute path"),
        ("hf://google/gemma-2b@../../main", "a '..' or '.' path segment"),
        ("hf://google\\..\\..\\x/y", "a backslash or a control character"),
    ],
)
def test_handle_climbing_out_of_the_download_cache(handle, problem):
    # Refused before kagglehub or huggingface_hub is imported: nothing is downloaded.
    with pytest.raises(ValueError, match=re.escape(repr(handle)) + " is not a valid handle: it "
                       rf"holds {problem}.*Write it as .*with plain names"):
        GemmaBackbone.from_preset(handle)


def test_symlink_out_of_the_preset_directory(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("not for a model")
    preset = tmp_path / "preset"
    preset.mkdir()
    (preset / "config.json").write_text(json.dumps(_TRANSFORMERS_CONFIG))
    os.symlink(secret, preset / "model.safetensors")
    with pytest.raises(ValueError, match=r"model.safetensors is a symbolic link to '.*secret.txt', "
                                         r"outside the preset directory .*Copy the real file"):
        GemmaBackbone.from_preset(str(preset))


def test_symlinked_config_out_of_the_preset_directory(tmp_path):
    outside = tmp_path / "elsewhere.json"
    outside.write_text(json.dumps(_TRANSFORMERS_CONFIG))
    (tmp_path / "preset").mkdir()
    os.symlink(outside, tmp_path / "preset" / "config.json")
    with pytest.raises(ValueError, match=r"config.json is a symbolic link to '.*elsewhere.json'"):
        GemmaBackbone.from_preset(str(tmp_path / "preset"))


def test_hugging_face_cache_links_inside_the_repository_are_allowed(tmp_path):
    # huggingface_hub's layout: snapshots/<revision>/<file> -> ../../blobs/<hash>.
    repository = tmp_path / "models--google--gemma"
    (repository / "blobs").mkdir(parents=True)
    (repository / "blobs" / "abc123").write_text("{}")
    snapshot = repository / "snapshots" / "main"
    snapshot.mkdir(parents=True)
    os.symlink("../../blobs/abc123", snapshot / "config.json")
    check_links_inside(str(snapshot))  # no error
    os.symlink(str(tmp_path), snapshot / "escape")
    with pytest.raises(ValueError, match="escape is a symbolic link"):
        check_links_inside(str(snapshot))


def test_shard_index_naming_a_file_outside_the_directory(tmp_path, transformers_tensors):
    directory = _transformers_directory(tmp_path / "bad", transformers_tensors)
    os.remove(os.path.join(directory, "model.safetensors"))
    index = {"weight_map": {name: "../stolen.safetensors" for name in transformers_tensors}}
    (tmp_path / "bad" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"model.safetensors.index.json names the weights file "
                                         r"'../stolen.safetensors', a path that leaves the preset "
                                         r"directory"):
        GemmaBackbone.from_preset(directory)
