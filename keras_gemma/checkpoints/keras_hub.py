"""KerasHub preset directories (Kaggle's `keras/gemma*` models) -> GemmaBackbone.

A KerasHub preset holds config.json (`registered_name` keras_hub>GemmaBackbone or
keras_hub>Gemma3Backbone), model.weights.h5 (or shards listed in model.weights.json) and
assets/tokenizer/vocabulary.spm. We read the h5 with h5py by path; KerasHub is never
imported and nothing named in the config is ever imported.
"""

import json
import os

import ml_dtypes
import numpy as np

from keras_gemma.checkpoints.huggingface import assign_checked
from keras_gemma.checkpoints.preset_files import shard_path

REGISTERED_NAMES = {
    "keras_hub>GemmaBackbone": "gemma",
    "keras_nlp>GemmaBackbone": "gemma",
    "keras_hub>Gemma3Backbone": "gemma3",
}

# Arguments that KerasHub's Gemma classes take and that never matter for text-only weights.
_IGNORED = {"name", "trainable", "dtype", "image_size", "vision_encoder", "text_only_model",
            "use_bidirectional_attention", "is_embedding_model", "pooling_intermediate_dim",
            "embedding_dim"}


# Arguments copied as they are into GemmaBackbone's.
_COPIED = (
    "vocabulary_size", "num_layers", "num_query_heads", "num_key_value_heads",
    "hidden_dim", "intermediate_dim", "head_dim", "layer_norm_epsilon", "dropout",
    "query_head_dim_normalize", "use_post_ffw_norm", "use_post_attention_norm",
    "attention_logit_soft_cap", "final_logit_soft_cap",
    "use_sliding_window_attention", "sliding_window_size",
)
# Gemma 3 arguments read by backbone_config_from_keras_hub.
_GEMMA3 = ("use_query_key_norm", "local_rope_scaling_factor", "global_rope_scaling_factor")


def is_keras_hub_config(config):
    return isinstance(config, dict) and config.get("registered_name") in REGISTERED_NAMES


def backbone_config_from_keras_hub(config):
    """GemmaBackbone arguments from a KerasHub config.json (Gemma 1/2 or Gemma 3 text)."""
    family = REGISTERED_NAMES[config["registered_name"]]
    source = dict(config.get("config") or {})
    if source.get("vision_encoder") not in (None, {}):
        raise ValueError(
            "this KerasHub preset is a multimodal Gemma 3 (it has a vision encoder); "
            "keras_gemma loads the text-only presets (e.g. gemma3_4b_text)."
        )
    if source.get("use_bidirectional_attention") or source.get("is_embedding_model"):
        raise ValueError("this KerasHub preset is an embedding model, not a causal LM.")
    arguments = {key: source[key] for key in _COPIED if key in source}
    if family == "gemma3":
        # KerasHub's Gemma 3 counts intermediate_dim as the FFN width (Gemma 1/2: twice it),
        # and fixes the layer pattern and RoPE bases in code.
        arguments["intermediate_dim"] = 2 * source["intermediate_dim"]
        arguments.update(
            use_query_key_norm=source.get("use_query_key_norm", True),
            sliding_window_pattern=6,
            local_rope_max_wavelength=10000.0,
            global_rope_max_wavelength=1000000.0,
            local_rope_scaling_factor=source.get("local_rope_scaling_factor", 1.0),
            global_rope_scaling_factor=source.get("global_rope_scaling_factor", 1.0),
        )
    else:
        arguments["sliding_window_pattern"] = 2
    return arguments


def _read_h5_tensors(directory):
    import h5py

    index_path = os.path.join(directory, "model.weights.json")
    single_path = os.path.join(directory, "model.weights.h5")
    if os.path.exists(index_path):
        with open(index_path) as file:
            index = json.load(file)
        files = sorted(set(index.get("weight_map", {}).values())) or sorted(
            name for name in os.listdir(directory) if name.endswith(".weights.h5")
        )
    elif os.path.exists(single_path):
        files = ["model.weights.h5"]
    else:
        raise FileNotFoundError(f"{directory} has no model.weights.h5 (KerasHub preset weights).")
    datasets = {}
    handles = []
    for name in files:
        path = shard_path(directory, name, index_path)
        try:
            handle = h5py.File(path, "r")
        except OSError as error:
            raise ValueError(f"{path} is not a readable h5 file (truncated or corrupt?): {error}") from None
        handles.append(handle)

        def visit(path_in_file, item):
            if isinstance(item, h5py.Dataset):
                datasets[path_in_file.removeprefix("/")] = item

        handle.visititems(visit)
    return datasets, handles


def _as_array(dataset):
    array = dataset[()]
    if dataset.attrs.get("dtype") == "bfloat16" or array.dtype.kind == "V":
        # Keras stores bfloat16 as opaque 2-byte records.
        array = array.view(ml_dtypes.bfloat16)
    return array


# KerasHub stores kernels (in, out); ours are (out, in) (layers/decode_matmul.py says why).
def heads_in(kernel):
    # [heads, hidden, head_dim] -> [heads, head_dim, hidden]
    return kernel.transpose(0, 2, 1)


def heads_out(kernel):
    # [heads, head_dim, hidden] -> [hidden, heads, head_dim]
    return kernel.transpose(2, 0, 1)


def _transpose(kernel):
    return kernel.T


def load_keras_hub_weights(backbone, directory, family):
    """Fills `backbone` from the h5 weights of a KerasHub preset directory."""
    datasets, handles = _read_h5_tensors(directory)
    try:
        block_name = "gemma3_decoder_block" if family == "gemma3" else "gemma_decoder_block"
        pairs = [
            (backbone.token_embedding.embeddings, "layers/reversible_embedding/vars/0"),
            (backbone.final_normalization.scale, "layers/rms_normalization/vars/0"),
        ]
        for index, block in enumerate(backbone.transformer_layers):
            base = f"layers/{block_name}{'' if index == 0 else f'_{index}'}/"
            attention = block.attention
            pairs += [
                (block.pre_attention_norm.scale, base + "pre_attention_norm/vars/0"),
                (attention.query_dense.kernel, base + "attention/query_dense/vars/0", heads_in),
                (attention.key_dense.kernel, base + "attention/key_dense/vars/0", heads_in),
                (attention.value_dense.kernel, base + "attention/value_dense/vars/0", heads_in),
                (attention.output_dense.kernel, base + "attention/output_dense/vars/0", heads_out),
                (block.pre_ffw_norm.scale, base + "pre_ffw_norm/vars/0"),
                (block.gating_ffw.kernel, base + "gating_ffw/vars/0", _transpose),
                (block.gating_ffw_2.kernel, base + "gating_ffw_2/vars/0", _transpose),
                (block.ffw_linear.kernel, base + "ffw_linear/vars/0", _transpose),
            ]
            if block.post_attention_norm is not None:
                pairs.append((block.post_attention_norm.scale, base + "post_attention_norm/vars/0"))
            if block.post_ffw_norm is not None:
                pairs.append((block.post_ffw_norm.scale, base + "post_ffw_norm/vars/0"))
            if attention.use_query_key_norm:
                pairs += [
                    (attention.query_norm.scale, base + "attention/query_norm/vars/0"),
                    (attention.key_norm.scale, base + "attention/key_norm/vars/0"),
                ]
        for variable, name, *transform in pairs:
            if name not in datasets:
                raise ValueError(f"{directory}: the KerasHub weights lack {name!r}.")
            value = _as_array(datasets[name])
            if transform:
                value = np.ascontiguousarray(transform[0](value))
            assign_checked(variable, value, name)
        unused = sorted(set(datasets) - {pair[1] for pair in pairs})
        if unused:
            raise ValueError(
                f"{directory}: the KerasHub weights hold tensors this architecture does not "
                f"use: {unused[:5]}. Does config.json match model.weights.h5?"
            )
    finally:
        for handle in handles:
            handle.close()
    return backbone


def keras_hub_tokenizer_path(directory):
    """The SentencePiece model inside a KerasHub preset, or None."""
    path = os.path.join(directory, "assets", "tokenizer", "vocabulary.spm")
    return path if os.path.exists(path) else None


def unused_keys(config):
    """Keys of a KerasHub backbone config that keras_gemma does not understand."""
    known = _IGNORED | set(_COPIED) | set(_GEMMA3)
    return sorted(set(config.get("config", {})) - known)


