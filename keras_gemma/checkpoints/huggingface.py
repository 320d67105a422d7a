"""Hugging Face transformers checkpoints (config.json + safetensors) <-> GemmaBackbone.

Reads the directory `save_pretrained` writes for `gemma`, `gemma2` and `gemma3_text`
models (and the text half of multimodal `gemma3`), without importing torch or
transformers: tensors are memory-mapped from the safetensors files.
"""

import json
import os

import keras
import ml_dtypes
import numpy as np

from keras_gemma.architecture_checks import check_architecture
from keras_gemma.checkpoints.config_values import config_integer
from keras_gemma.checkpoints.config_values import config_number
from keras_gemma.checkpoints.preset_files import shard_path as checked_shard_path
from keras_gemma.checkpoints.safetensors_io import SafetensorsFile

SUPPORTED_MODEL_TYPES = ("gemma", "gemma2", "gemma3_text", "gemma3")
# GemmaBackbone's argument -> transformers' config.json key, for errors naming the file's entry.
TRANSFORMERS_NAMES = {
    "vocabulary_size": "vocab_size", "num_layers": "num_hidden_layers",
    "num_query_heads": "num_attention_heads", "num_key_value_heads": "num_key_value_heads",
    "hidden_dim": "hidden_size", "head_dim": "head_dim", "layer_norm_epsilon": "rms_norm_eps",
    "sliding_window_size": "sliding_window", "query_pre_attn_scalar": "query_pre_attn_scalar",
    "attention_logit_soft_cap": "attn_logit_softcapping",
    "final_logit_soft_cap": "final_logit_softcapping",
}


def is_transformers_config(config):
    """Whether a parsed config.json was written by transformers for a Gemma model."""
    return isinstance(config, dict) and config.get("model_type") in SUPPORTED_MODEL_TYPES


def _rope_settings(config, model_type, where):
    """(local wavelength, global wavelength, local scaling, global scaling)."""

    def parse(parameters, section):
        if not isinstance(parameters, dict):
            raise ValueError(f"{where}: `{section}` must be a JSON object, got {parameters!r}.")
        rope_type = parameters.get("rope_type", parameters.get("type", "default"))
        if rope_type not in ("default", "linear"):
            raise ValueError(
                f"{where}: RoPE type {rope_type!r} in {section} is not supported by "
                "keras_gemma (supported: 'default' and 'linear')."
            )
        entry = f"{where} ({section})"
        factor = config_number(parameters, "factor", entry, 1.0) if rope_type == "linear" else 1.0
        return config_number(parameters, "rope_theta", entry, 10000.0), factor

    parameters = config.get("rope_parameters")
    if isinstance(parameters, dict) and "full_attention" in parameters:
        global_theta, global_factor = parse(parameters["full_attention"], "full_attention")
        local = parameters.get("sliding_attention", parameters["full_attention"])
        local_theta, local_factor = parse(local, "sliding_attention")
        return local_theta, global_theta, local_factor, global_factor
    if isinstance(parameters, dict):
        theta, factor = parse(parameters, "rope_parameters")
        return theta, theta, factor, factor
    # transformers 4.x layout: rope_theta (+ rope_local_base_freq and rope_scaling on Gemma 3,
    # where the scaling applies to the global layers only).
    global_theta = config_number(config, "rope_theta", where, 10000.0)
    scaling = config.get("rope_scaling") or {}
    _, global_factor = parse({**scaling, "rope_theta": global_theta}, "rope_scaling")
    if model_type == "gemma3_text":
        local_theta = config_number(config, "rope_local_base_freq", where, 10000.0)
        return local_theta, global_theta, 1.0, global_factor
    return global_theta, global_theta, global_factor, global_factor


def _sliding_window_pattern(config, model_type, num_layers, where):
    """(use_sliding_window_attention, pattern) from layer_types or the 4.x defaults."""
    layer_types = config.get("layer_types")
    if layer_types is None:
        if model_type == "gemma":
            return False, 2
        if model_type == "gemma2":
            return True, 2
        return True, config_integer(config, "sliding_window_pattern", where, 6)
    if len(layer_types) != num_layers:
        raise ValueError(
            f"{where}: layer_types has {len(layer_types)} entries for {num_layers} layers "
            "(num_hidden_layers); the two must agree. Is config.json the right one?"
        )
    if all(kind == "full_attention" for kind in layer_types):
        return False, 2
    first_global = next(
        (i for i, kind in enumerate(layer_types) if kind == "full_attention"), None
    )
    pattern = num_layers + 1 if first_global is None else first_global + 1
    expected = [
        "full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
        for i in range(num_layers)
    ]
    if list(layer_types) != expected:
        raise ValueError(
            f"{where}: layer_types does not follow a repeating local/global pattern "
            f"(every N-th layer global), which keras_gemma needs; got {layer_types}."
        )
    return True, pattern


def backbone_config_from_transformers(config, where="config.json"):
    """Translates a transformers Gemma config dict into GemmaBackbone arguments.

    `where` (the file's path) names the file in errors about its values.

    Example:
    >>> backbone_config_from_transformers(json.load(open("config.json")))["hidden_dim"]
    640
    """
    model_type = config.get("model_type")
    if model_type == "gemma3":
        where = f"{where} (text_config)"
        config = dict(config.get("text_config") or {})
        model_type = "gemma3_text"
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"config.json has model_type {model_type!r}; keras_gemma reads transformers "
            f"checkpoints of model_type {', '.join(SUPPORTED_MODEL_TYPES)}."
        )
    activation = config.get("hidden_activation") or config.get("hidden_act") or "gelu_pytorch_tanh"
    if activation not in ("gelu_pytorch_tanh", "gelu", "gelu_tanh"):
        raise ValueError(
            f"{where}: activation {activation!r} is not Gemma's GELU; keras_gemma cannot "
            "load this model (is it a Gemma checkpoint?)."
        )
    hidden = config_integer(config, "hidden_size", where)
    heads = config_integer(config, "num_attention_heads", where)
    num_layers = config_integer(config, "num_hidden_layers", where)
    arguments = {
        "vocabulary_size": config_integer(config, "vocab_size", where),
        "num_layers": num_layers,
        "num_query_heads": heads,
        "num_key_value_heads": config_integer(config, "num_key_value_heads", where, heads),
        "hidden_dim": hidden,
        "intermediate_dim": 2 * config_integer(config, "intermediate_size", where),
        "head_dim": config_integer(config, "head_dim", where, hidden // max(heads, 1)),
        "layer_norm_epsilon": config_number(config, "rms_norm_eps", where, 1e-6),
    }
    # Sizes checked now, naming config.json's keys, before any layer or weight is made.
    check_architecture(arguments, where, TRANSFORMERS_NAMES)
    local_theta, global_theta, local_factor, global_factor = _rope_settings(config, model_type, where)
    arguments.update(
        local_rope_max_wavelength=local_theta,
        global_rope_max_wavelength=global_theta,
        local_rope_scaling_factor=local_factor,
        global_rope_scaling_factor=global_factor,
    )
    if model_type == "gemma":
        return arguments
    use_sliding, pattern = _sliding_window_pattern(config, model_type, num_layers, where)
    window = config.get("sliding_window")
    arguments.update(
        query_pre_attn_scalar=config.get("query_pre_attn_scalar", arguments["head_dim"]),
        use_post_attention_norm=True,
        use_post_ffw_norm=True,
        use_query_key_norm=model_type == "gemma3_text",
        attention_logit_soft_cap=config.get("attn_logit_softcapping"),
        final_logit_soft_cap=config.get("final_logit_softcapping"),
        use_sliding_window_attention=use_sliding and window is not None,
        sliding_window_size=config_integer(config, "sliding_window", where, 4096),
        sliding_window_pattern=pattern,
    )
    check_architecture(arguments, where, TRANSFORMERS_NAMES)
    return arguments


class _Shards:
    """Several safetensors files read as one `{name: tensor}` mapping."""

    def __init__(self, files):
        self._owner = {}
        for weights in files:
            for name in weights.keys():
                self._owner[name] = weights

    def keys(self):
        return self._owner.keys()

    def __contains__(self, name):
        return name in self._owner

    def __iter__(self):
        return iter(self._owner)

    def __getitem__(self, name):
        return self._owner[name][name]

    def read(self, name):
        return self._owner[name].read(name)


def _index_weight_map(index_path):
    """The `weight_map` of a shard index: `{tensor name: shard file name}`, checked."""
    try:
        with open(index_path) as file:
            weight_map = json.load(file).get("weight_map")
    except (ValueError, AttributeError) as error:
        raise ValueError(f"{index_path} is not a shard index (a JSON object): {error}. "
                         "Download the checkpoint again.") from None
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index_path} has no `weight_map` object (got {weight_map!r}). "
                         "Download the checkpoint again.")
    return weight_map


def read_transformers_tensors(directory):
    """All tensors of model.safetensors or its shards, memory-mapped, as one mapping."""
    index_path = os.path.join(directory, "model.safetensors.index.json")
    single_path = os.path.join(directory, "model.safetensors")
    if os.path.exists(index_path):
        weight_map = _index_weight_map(index_path)
        files = []
        for shard in sorted(set(weight_map.values())):
            shard_path = checked_shard_path(directory, shard, index_path)
            if not os.path.exists(shard_path):
                raise FileNotFoundError(
                    f"{index_path} names the shard {shard!r}, which is missing from {directory}."
                )
            files.append(SafetensorsFile(shard_path))
        return _Shards(files)
    if os.path.exists(single_path):
        return _Shards([SafetensorsFile(single_path)])
    raise FileNotFoundError(
        f"{directory} has no model.safetensors (nor model.safetensors.index.json). "
        "keras_gemma reads safetensors only: never pickled .bin files, which can run code."
    )


def _language_model_prefix(names):
    for name in names:
        if name.endswith("embed_tokens.weight"):
            return name[: -len("embed_tokens.weight")]
    raise ValueError("the checkpoint has no '*embed_tokens.weight' tensor: it is not a Gemma model.")


def transformers_weight_map(backbone, tensor_names):
    """Pairs each backbone variable with (checkpoint name, transform from numpy)."""
    prefix = _language_model_prefix(tensor_names)
    table = transformers_weight_table(backbone, prefix)
    return prefix, [(variable, name, to_ours) for variable, name, to_ours, _ in table]


def transformers_weight_table(backbone, prefix="model."):
    """The one name and layout table between our variables and transformers' tensors.

    Returns `[(variable, transformers name, to_ours, to_transformers)]`: `to_ours` turns a
    numpy tensor read from a checkpoint into the variable's layout, `to_transformers` the
    variable's value into the checkpoint's. Loading (here and in gguf.py) uses the first,
    export (keras_gemma.export) the second, so the two directions cannot drift apart.

    Example:
    >>> variable, name, to_ours, to_transformers = transformers_weight_table(backbone)[2]
    >>> name
    'model.layers.0.input_layernorm.weight'
    """
    heads = backbone.num_query_heads
    kv_heads = backbone.num_key_value_heads
    head_dim = backbone.head_dim
    hidden = backbone.hidden_dim

    # transformers stores (out, in) like us: only the head axes need splitting out (loading)
    # or merging back (export).
    def heads_in(count):
        # [count * head_dim, hidden] <-> [count, head_dim, hidden]
        return (lambda w: w.reshape(count, head_dim, hidden),
                lambda w: w.reshape(count * head_dim, hidden))

    # [hidden, heads * head_dim] <-> [hidden, heads, head_dim]
    heads_out = (lambda w: w.reshape(hidden, heads, head_dim),
                 lambda w: w.reshape(hidden, heads * head_dim))

    def same_fn(w):
        return w

    same = (same_fn, same_fn)

    entries = [
        (backbone.token_embedding.embeddings, prefix + "embed_tokens.weight", same),
        (backbone.final_normalization.scale, prefix + "norm.weight", same),
    ]
    for index, block in enumerate(backbone.transformer_layers):
        name = f"{prefix}layers.{index}."
        attention = block.attention
        entries += [
            (block.pre_attention_norm.scale, name + "input_layernorm.weight", same),
            (attention.query_dense.kernel, name + "self_attn.q_proj.weight", heads_in(heads)),
            (attention.key_dense.kernel, name + "self_attn.k_proj.weight", heads_in(kv_heads)),
            (attention.value_dense.kernel, name + "self_attn.v_proj.weight", heads_in(kv_heads)),
            (attention.output_dense.kernel, name + "self_attn.o_proj.weight", heads_out),
            (block.gating_ffw.kernel, name + "mlp.gate_proj.weight", same),
            (block.gating_ffw_2.kernel, name + "mlp.up_proj.weight", same),
            (block.ffw_linear.kernel, name + "mlp.down_proj.weight", same),
        ]
        if block.post_attention_norm is not None:
            entries += [
                (block.post_attention_norm.scale, name + "post_attention_layernorm.weight", same),
                (block.pre_ffw_norm.scale, name + "pre_feedforward_layernorm.weight", same),
            ]
        else:
            # Gemma 1 calls its pre-FFN norm "post_attention_layernorm".
            entries.append((block.pre_ffw_norm.scale, name + "post_attention_layernorm.weight", same))
        if block.post_ffw_norm is not None:
            entries.append((block.post_ffw_norm.scale, name + "post_feedforward_layernorm.weight", same))
        if attention.use_query_key_norm:
            entries += [
                (attention.query_norm.scale, name + "self_attn.q_norm.weight", same),
                (attention.key_norm.scale, name + "self_attn.k_norm.weight", same),
            ]
    return [(variable, name, to_ours, to_theirs)
            for variable, name, (to_ours, to_theirs) in entries]


def assign_checked(variable, value, source_name):
    """Assigns a numpy array to a Keras variable after checking its shape."""
    if tuple(value.shape) != tuple(variable.shape):
        raise ValueError(
            f"shape mismatch for {variable.path} (from {source_name!r}): the checkpoint has "
            f"{tuple(value.shape)}, the model expects {tuple(variable.shape)}."
        )
    dtype = str(variable.dtype)
    value = np.asarray(value, dtype=ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)
    if dtype == "bfloat16" and keras.backend.backend() == "torch":
        # Keras' torch backend converts a bfloat16 array through a float32 copy (2.1 GB
        # more at load for gemma_2b_en's embedding); the same bits viewed as a torch
        # bfloat16 tensor need no copy.
        import torch

        value = torch.from_numpy(np.ascontiguousarray(value).view(np.int16)).view(torch.bfloat16)
    variable.assign(value)


def checkpoint_shape(variable, to_theirs):
    """The shape `variable` has in the checkpoint's layout, found without allocating it.

    `to_theirs` runs on a stand-in of the variable's shape whose strides are all zero (one
    byte of memory), so a 2 GB embedding costs nothing to ask about.

    Example:
    >>> variable, name, _, to_theirs = transformers_weight_table(backbone)[3]
    >>> checkpoint_shape(variable, to_theirs)        # q_proj: (heads * head_dim, hidden)
    (32, 32)
    """
    shape = tuple(variable.shape)
    stand_in = np.lib.stride_tricks.as_strided(
        np.zeros(1, "int8"), shape=shape, strides=(0,) * len(shape), writeable=False
    )
    return tuple(to_theirs(stand_in).shape)


def load_transformers_weights(backbone, directory):
    """Fills `backbone` with the weights of the transformers checkpoint in `directory`."""
    tensors = read_transformers_tensors(directory)
    prefix = _language_model_prefix(tensors.keys())
    used = set()
    for variable, name, transform, to_theirs in transformers_weight_table(backbone, prefix):
        if name not in tensors:
            raise ValueError(
                f"{directory}: the checkpoint lacks the tensor {name!r}. Is config.json the "
                "right one for these weights?"
            )
        # Checked before reshaping: a reshape would fail naming no tensor, or (same size,
        # other shape) silently scramble the weights.
        expected, stored = checkpoint_shape(variable, to_theirs), tuple(tensors[name].shape)
        if stored != expected:
            raise ValueError(
                f"{directory}: tensor {name!r} has shape {stored}, but config.json describes a "
                f"model whose {name!r} is {expected}. Is config.json the right one for these "
                "weights? Download the checkpoint again if it is."
            )
        # The transforms are transposes and reshapes; ascontiguousarray makes the owned copy
        # (never an alias of the memory map, which a backend could write into).
        value = np.ascontiguousarray(transform(tensors.read(name)))
        assign_checked(variable, value, name)
        used.add(name)
    # lm_head is the tied embedding in Gemma; other models' towers live outside the prefix.
    unknown = sorted(
        name
        for name in tensors
        if name.startswith(prefix) and name not in used and not name.endswith("lm_head.weight")
    )
    if unknown:
        raise ValueError(
            f"{directory}: the checkpoint has tensors this architecture does not use: "
            f"{unknown[:5]}{' ...' if len(unknown) > 5 else ''}. Is config.json the right one?"
        )
