"""A Gemma model written as a Hugging Face transformers directory.

`export_to_transformers` writes what `save_pretrained` would: `config.json` (model_type
`gemma`, `gemma2` or `gemma3_text`), `model.safetensors`, `generation_config.json` and the
tokenizer (`tokenizer.model`, SentencePiece, with `tokenizer_config.json` and
`special_tokens_map.json`). transformers loads it with `AutoModelForCausalLM` and
`AutoTokenizer` and no code of ours. Tensor names and layouts come from the table the loader
uses (`keras_gemma.checkpoints.huggingface.transformers_weight_table`), so a directory
written here reads back into the same model.
"""

import json
import os

from keras_gemma.checkpoints.huggingface import transformers_weight_table
from keras_gemma.checkpoints.safetensors_io import write_safetensors
from keras_gemma.atomic_write import atomic_directory
from keras_gemma.export.common import (
    generation_of,
    model_parts,
    query_scalar,
    special_ids,
    to_numpy_value,
)

_CLASSES = {"gemma": ("gemma", "GemmaForCausalLM"),
            "gemma2": ("gemma2", "Gemma2ForCausalLM"),
            "gemma3": ("gemma3_text", "Gemma3ForCausalLM")}
_DTYPES = ("float32", "bfloat16", "float16")


def _rope(wavelength, factor):
    if factor == 1.0:
        return {"rope_type": "default", "rope_theta": float(wavelength)}
    return {"rope_type": "linear", "rope_theta": float(wavelength), "factor": float(factor)}


def transformers_config(backbone, tokenizer=None, dtype="float32"):
    """The transformers `config.json` dict that computes what `backbone` computes.

    The inverse of `huggingface.backbone_config_from_transformers`: reading the dict back
    gives the backbone's architecture (tests/test_transformers_export.py checks both ways).

    Example:
    >>> transformers_config(lm.backbone)["model_type"]
    'gemma3_text'
    """
    generation = generation_of(backbone)
    model_type, class_name = _CLASSES[generation]
    ids = special_ids(tokenizer)
    config = {
        "architectures": [class_name],
        "model_type": model_type,
        "vocab_size": backbone.vocabulary_size,
        "hidden_size": backbone.hidden_dim,
        "intermediate_size": backbone.intermediate_dim // 2,  # ours counts gate + up
        "num_hidden_layers": backbone.num_layers,
        "num_attention_heads": backbone.num_query_heads,
        "num_key_value_heads": backbone.num_key_value_heads,
        "head_dim": backbone.head_dim,
        "rms_norm_eps": backbone.layer_norm_epsilon,
        "hidden_activation": "gelu_pytorch_tanh",
        "hidden_act": "gelu_pytorch_tanh",
        "max_position_embeddings": 32768 if generation == "gemma3" else 8192,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "bos_token_id": ids["bos"],
        "eos_token_id": ids["eos"],
        "pad_token_id": ids["pad"],
        "tie_word_embeddings": True,
        "use_cache": True,
        "dtype": dtype,
    }
    if generation == "gemma":
        config["rope_parameters"] = _rope(backbone.global_rope_max_wavelength,
                                          backbone.global_rope_scaling_factor)
        return config
    layer_types = [
        "full_attention" if backbone.is_global_layer(
            index, backbone.use_sliding_window_attention, backbone.sliding_window_pattern)
        else "sliding_attention"
        for index in range(backbone.num_layers)
    ]
    config.update(
        query_pre_attn_scalar=query_scalar(backbone),
        sliding_window=backbone.sliding_window_size,
        layer_types=layer_types,
        attn_logit_softcapping=backbone.attention_logit_soft_cap,
        final_logit_softcapping=backbone.final_logit_soft_cap,
    )
    if generation == "gemma2":
        config["rope_parameters"] = _rope(backbone.global_rope_max_wavelength,
                                          backbone.global_rope_scaling_factor)
    else:
        config["rope_parameters"] = {
            "full_attention": _rope(backbone.global_rope_max_wavelength,
                                    backbone.global_rope_scaling_factor),
            "sliding_attention": _rope(backbone.local_rope_max_wavelength,
                                       backbone.local_rope_scaling_factor),
        }
        config["use_bidirectional_attention"] = False
    return config


# Gemma's turn format, written for transformers' apply_chat_template (Jinja): the same text
# as GemmaTokenizer.apply_chat_template, with <bos> in front, since transformers tokenizes a
# templated chat without adding special tokens. A system message is folded into the first
# user turn (Gemma has no system role); "assistant" is Gemma's "model".
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- set ns = namespace(system='', turns=messages) -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set ns.system = messages[0]['content'] | trim + '\n\n' -%}"
    "{%- set ns.turns = messages[1:] -%}"
    "{%- endif -%}"
    "{%- for message in ns.turns -%}"
    "{%- set role = 'model' if message['role'] in ['assistant', 'model'] else message['role'] -%}"
    "{%- if (role == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Gemma chat roles must alternate user/model, starting with user.') }}"
    "{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (ns.system if loop.first else '')"
    " + message['content'] | trim + '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


def _tokenizer_files(tokenizer, ids):
    """{file name: JSON dict} of the tokenizer besides tokenizer.model."""
    vocabulary = tokenizer.get_vocabulary()
    special = {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>",
               "pad_token": "<pad>"}
    # The chat markers are special in Gemma's own transformers tokenizer: they are skipped by
    # decode(skip_special_tokens=True) and never split. "additional_special_tokens" is read
    # by transformers 4 and 5 alike.
    extra = [vocabulary[ids[key]] for key in ("start_of_turn", "end_of_turn")
             if ids[key] is not None]
    tokenizer_config = {
        "tokenizer_class": "GemmaTokenizer",
        **special,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "spaces_between_special_tokens": False,
        "padding_side": "left",
        "model_max_length": 1_000_000_000_000_000_019_884_624_838_656,
        "additional_special_tokens": extra,
    }
    if len(extra) == 2:
        tokenizer_config["chat_template"] = CHAT_TEMPLATE
    special_tokens_map = {**special, "additional_special_tokens": extra}
    return {"tokenizer_config.json": tokenizer_config,
            "special_tokens_map.json": special_tokens_map}


def export_to_transformers(model, path, tokenizer=None, dtype=None):
    """Writes `model` as a transformers checkpoint directory at `path`; returns the path.

    Args:
        model: a `GemmaCausalLM` (its tokenizer comes from its preprocessor) or a
            `GemmaBackbone` (pass `tokenizer=`; without one only the model files are written).
        path: the directory to write. Written into a temporary sibling and renamed at the end,
            so a failure leaves nothing behind; an earlier export there is replaced, any other
            non-empty directory refused.
        tokenizer: a `GemmaTokenizer`, overriding the causal LM's.
        dtype: "float32", "bfloat16" or "float16" for the saved weights (default: the
            model's own).

    Example:
    ```python
    lm = keras_gemma.GemmaCausalLM.from_preset("gemma3_270m", dtype="float32")
    export_to_transformers(lm, "./gemma_hf")
    # elsewhere, with no keras_gemma:
    model = transformers.AutoModelForCausalLM.from_pretrained("./gemma_hf")
    tokenizer = transformers.AutoTokenizer.from_pretrained("./gemma_hf")
    ```
    """
    backbone, tokenizer = model_parts(model, tokenizer)
    if dtype is not None and dtype not in _DTYPES:
        raise ValueError(f"export_to_transformers: dtype must be one of {_DTYPES}; got {dtype!r}.")
    tensors = {}
    for variable, name, _, to_transformers in transformers_weight_table(backbone, "model."):
        value = to_transformers(to_numpy_value(variable, name))
        if dtype is not None:
            import ml_dtypes

            value = value.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)
        tensors[name] = value
    saved_dtype = dtype or str(next(iter(tensors.values())).dtype)
    config = transformers_config(backbone, tokenizer, dtype=saved_dtype)
    ids = special_ids(tokenizer)
    # What generate() stops on by default here: <eos>, and <end_of_turn> where it exists.
    stops = [ids["eos"]] + ([ids["end_of_turn"]] if ids["end_of_turn"] is not None else [])
    generation_config = {"bos_token_id": ids["bos"], "pad_token_id": ids["pad"],
                         "eos_token_id": stops if len(stops) > 1 else stops[0]}
    files = {"config.json": config, "generation_config.json": generation_config}
    if tokenizer is not None:
        files.update(_tokenizer_files(tokenizer, ids))
    destination = dict(marker="config.json", description="an earlier export")
    with atomic_directory(path, **destination) as staging:
        write_safetensors(os.path.join(staging, "model.safetensors"), tensors,
                          metadata={"format": "pt"})
        for name, content in files.items():
            with open(os.path.join(staging, name), "w") as file:
                json.dump(content, file, indent=2)
        if tokenizer is not None:
            with open(os.path.join(staging, "tokenizer.model"), "wb") as file:
                file.write(tokenizer.proto)
    return os.path.abspath(os.fspath(path))
