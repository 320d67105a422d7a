"""What the transformers and GGUF exports share: the model's parts, its generation and its
weights as numpy arrays. Their atomic writes are keras_gemma.atomic_write's.
"""


import keras
import ml_dtypes
import numpy as np


def model_parts(model, tokenizer=None):
    """(backbone, tokenizer or None) of a GemmaCausalLM or of a GemmaBackbone.

    A causal LM brings its tokenizer through its preprocessor; a backbone needs `tokenizer=`
    (without one, only the weights are exported).
    """
    backbone = getattr(model, "backbone", None)
    if backbone is None:
        if not hasattr(model, "transformer_layers"):
            raise TypeError(
                "export: `model` must be a keras_gemma GemmaCausalLM or GemmaBackbone; got "
                f"{type(model).__name__}."
            )
        backbone = model
    elif tokenizer is None and getattr(model, "preprocessor", None) is not None:
        tokenizer = model.preprocessor.tokenizer
    if tokenizer is not None and not isinstance(getattr(tokenizer, "proto", None), bytes):
        raise TypeError(
            "export: `tokenizer` must be a keras_gemma GemmaTokenizer (with its SentencePiece "
            f"`proto`); got {type(tokenizer).__name__}."
        )
    return backbone, tokenizer


def query_scalar(backbone):
    """The number whose inverse square root scales the queries (GemmaBackbone's rule)."""
    if backbone.query_pre_attn_scalar is not None:
        return backbone.query_pre_attn_scalar
    if backbone.query_head_dim_normalize:
        return backbone.head_dim
    return backbone.hidden_dim // backbone.num_query_heads


def generation_of(backbone):
    """"gemma", "gemma2" or "gemma3": the transformers/llama.cpp family that computes exactly
    what `backbone` computes; a ValueError naming the switch when none does."""
    post_norms = (backbone.use_post_attention_norm, backbone.use_post_ffw_norm)
    if backbone.use_query_key_norm:
        generation = "gemma3"
    elif any(post_norms) or backbone.use_sliding_window_attention or (
        backbone.attention_logit_soft_cap or backbone.final_logit_soft_cap
    ):
        generation = "gemma2"
    else:
        generation = "gemma"
    problems = []
    if generation != "gemma" and not all(post_norms):
        problems.append("Gemma 2 and 3 models have both the post-attention and post-FFN norms "
                        f"(use_post_attention_norm, use_post_ffw_norm = {post_norms})")
    if generation == "gemma" and query_scalar(backbone) != backbone.head_dim:
        problems.append("Gemma 1 scales queries by head_dim ** -0.5; this model uses "
                        f"query_pre_attn_scalar {query_scalar(backbone)}")
    if generation != "gemma3" and (
        backbone.local_rope_max_wavelength != backbone.global_rope_max_wavelength
        or backbone.local_rope_scaling_factor != backbone.global_rope_scaling_factor
    ):
        problems.append("only Gemma 3 has separate local and global RoPE settings")
    if problems:
        raise ValueError(
            f"export: this model fits no Gemma generation that transformers or llama.cpp "
            f"implement ({'; '.join(problems)}). Export a model built with a released "
            "Gemma architecture."
        )
    return generation


def to_numpy_value(value, where):
    """A variable's (or LoRA-merged kernel's) value as numpy; float32 or bfloat16 kept."""
    if isinstance(value, keras.Variable):
        value = value.value
    dtype = keras.backend.standardize_dtype(value.dtype)
    if "int" in dtype:
        raise ValueError(
            f"export: {where} holds quantized {dtype} values; export a float model (load the "
            "checkpoint without quantizing, or before calling quantize())."
        )
    if dtype == "bfloat16" and keras.backend.backend() == "torch":
        import torch

        # numpy has no bfloat16: view torch's bits, which keeps the values exact.
        array = value.detach().cpu().contiguous().view(torch.int16).numpy()
        return array.view(ml_dtypes.bfloat16)
    array = np.asarray(keras.ops.convert_to_numpy(value))
    return array.astype(ml_dtypes.bfloat16) if dtype == "bfloat16" else array


def special_ids(tokenizer):
    """{"bos", "eos", "pad", "unk", "start_of_turn", "end_of_turn"} ids (None where absent)."""
    if tokenizer is None:
        return {"bos": 2, "eos": 1, "pad": 0, "unk": 3, "start_of_turn": None, "end_of_turn": None}
    return {"bos": tokenizer.start_token_id, "eos": tokenizer.end_token_id,
            "pad": tokenizer.pad_token_id, "unk": tokenizer.unk_token_id,
            "start_of_turn": tokenizer.start_of_turn_id, "end_of_turn": tokenizer.end_of_turn_id}
