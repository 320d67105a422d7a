"""A Gemma model written as a GGUF file (llama.cpp's format), tokenizer included.

`export_to_gguf` writes with the `gguf` package's own `GGUFWriter` (`pip install
'keras-gemma[gguf]'`), in llama.cpp's Gemma layout: the tensor names, norm scales stored as
1 + w, matrices (out, in), and the SentencePiece vocabulary as llama.cpp's converter stores
it. Names and layouts come from the table keras_gemma's GGUF loader uses
(`keras_gemma.checkpoints.gguf.gguf_tensor_table`), so a file written here reads back into
the same model; transformers' `gguf_file=` reader is the independent check (tests).
"""

import os

import numpy as np

from keras_gemma.checkpoints.gguf import _gguf_module, _matching_card, gguf_tensor_table
from keras_gemma.checkpoints.sentencepiece_proto import CONTROL, UNKNOWN, USER_DEFINED
from keras_gemma.checkpoints.sentencepiece_proto import read_model
from keras_gemma.atomic_write import atomic_file
from keras_gemma.export.common import (
    generation_of,
    model_parts,
    query_scalar,
    special_ids,
    to_numpy_value,
)

DTYPES = ("f16", "bf16", "q8_0")
_Q8_0_BLOCK = 32  # values per Q8_0 block: a row must be a multiple of it


def llama_cpp_vocabulary(proto):
    """(tokens, scores, types, add_space_prefix) as llama.cpp's converter stores Gemma's vocabulary.

    The inverse of `keras_gemma.checkpoints.gguf_vocabulary.sentencepiece_proto`: `<unk>` and
    the `<...>` user-defined pieces (chat markers, `<mask>`, `<unusedN>`) become CONTROL, other
    user-defined pieces (whitespace runs) are spelled with real spaces instead of '▁', and
    these pieces score -1000, as in llama.cpp's Gemma files.
    """
    pieces, add_dummy_prefix = read_model(proto)
    tokens, scores, types = [], [], []
    for piece, score, kind in pieces:
        if kind == UNKNOWN or (kind == USER_DEFINED and piece.startswith("<")) or (
            kind == USER_DEFINED and piece == "[@BOS@]"
        ):
            kind, score = CONTROL, -1000.0
        elif kind == USER_DEFINED:
            piece, score = piece.replace("\u2581", " "), -1000.0
        elif kind == CONTROL:
            score = -1000.0
        tokens.append(piece)
        scores.append(float(score))
        types.append(int(kind))
    return tokens, scores, types, add_dummy_prefix


def _encode(gguf, array, dtype):
    """(data, raw type) of one tensor: norms (1-D) stay float32, as llama.cpp keeps them."""
    array = np.asarray(array, dtype=np.float32)
    if array.ndim == 1:
        return array, None
    if dtype == "q8_0" and array.shape[-1] % _Q8_0_BLOCK == 0:
        kind = gguf.GGMLQuantizationType.Q8_0
    elif dtype == "bf16":
        kind = gguf.GGMLQuantizationType.BF16
    else:  # f16, and q8_0 rows that are not whole blocks (llama.cpp falls back the same way)
        return array.astype(np.float16), None
    return gguf.quants.quantize(array, kind), kind


def _check_query_scaling(generation, backbone):
    """GGUF has no key for the query scaling: readers assume head_dim (llama.cpp: or its
    per-size rule for 27B models; keras_gemma: the matching preset card)."""
    scalar = query_scalar(backbone)
    if generation == "gemma" or scalar == backbone.head_dim:
        return
    card = _matching_card(generation, backbone.get_config())
    if card is None or card.get("backbone", {}).get("query_pre_attn_scalar") != scalar:
        raise ValueError(
            f"export_to_gguf: this model scales queries by {scalar} ** -0.5, not head_dim "
            f"({backbone.head_dim}) ** -0.5, and GGUF has no key to say so: readers of the file "
            "would compute other logits. Export it with export_to_transformers instead."
        )


def _write_architecture(writer, gguf, generation, backbone):
    writer.add_context_length(32768 if generation == "gemma3" else 8192)
    writer.add_embedding_length(backbone.hidden_dim)
    writer.add_block_count(backbone.num_layers)
    writer.add_feed_forward_length(backbone.intermediate_dim // 2)
    writer.add_head_count(backbone.num_query_heads)
    writer.add_head_count_kv(backbone.num_key_value_heads)
    writer.add_key_length(backbone.head_dim)
    writer.add_value_length(backbone.head_dim)
    writer.add_layer_norm_rms_eps(backbone.layer_norm_epsilon)
    writer.add_rope_freq_base(backbone.global_rope_max_wavelength)
    if backbone.local_rope_scaling_factor != 1.0:
        raise ValueError(
            "export_to_gguf: GGUF has no key for RoPE scaling on local (sliding-window) layers; "
            f"this model scales them by {backbone.local_rope_scaling_factor}."
        )
    if backbone.global_rope_scaling_factor != 1.0:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(backbone.global_rope_scaling_factor)
    if generation == "gemma":
        return
    if generation == "gemma3":
        writer.add_rope_freq_base_swa(backbone.local_rope_max_wavelength)
    writer.add_sliding_window(backbone.sliding_window_size)
    # One flag per layer, True where the layer is local (llama.cpp's convention).
    writer.add_sliding_window_pattern([
        not backbone.is_global_layer(
            index, backbone.use_sliding_window_attention, backbone.sliding_window_pattern)
        for index in range(backbone.num_layers)
    ])
    if backbone.attention_logit_soft_cap is not None:
        writer.add_attn_logit_softcapping(backbone.attention_logit_soft_cap)
    if backbone.final_logit_soft_cap is not None:
        writer.add_final_logit_softcapping(backbone.final_logit_soft_cap)


def _write_tokenizer(writer, tokenizer):
    tokens, scores, types, add_space_prefix = llama_cpp_vocabulary(tokenizer.proto)
    ids = special_ids(tokenizer)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    for key, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                     ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        if ids[key] is not None:
            add(ids[key])
    if ids["end_of_turn"] is not None:
        writer.add_eot_token_id(ids["end_of_turn"])
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(add_space_prefix)


def export_to_gguf(model, path, dtype="f16", tokenizer=None, name=None, progress=None):
    """Writes `model` as a GGUF file at `path` (the tokenizer included); returns the path.

    Args:
        model: a `GemmaCausalLM` (its tokenizer comes from its preprocessor) or a
            `GemmaBackbone` with `tokenizer=`. A GGUF file without its vocabulary is of no
            use to llama.cpp, so a tokenizer is required.
        path: the .gguf file to write: written to a temporary sibling and renamed at the
            end, so a failure leaves nothing behind.
        dtype: the type of the matrices: "f16", "bf16" or "q8_0" (8-bit blocks of 32 with a
            float16 scale; a matrix whose rows are not whole blocks is kept in f16). Norms
            stay float32, as llama.cpp keeps them.
        tokenizer: a `GemmaTokenizer`, overriding the causal LM's.
        name: `general.name` in the file (default "Gemma"); keras_gemma's loader reads an
            "it" word in it as an instruction-tuned model.
        progress: optional callable taking a status string, called as tensors are encoded.

    Example:
    ```python
    lm = keras_gemma.GemmaCausalLM.from_preset("gemma3_270m")
    export_to_gguf(lm, "gemma3-270m-q8_0.gguf", dtype="q8_0")
    # llama.cpp: llama-cli -m gemma3-270m-q8_0.gguf -p "Once upon a time"
    ```
    """
    gguf = _gguf_module()
    if dtype not in DTYPES:
        raise ValueError(f"export_to_gguf: dtype must be one of {DTYPES}; got {dtype!r}.")
    backbone, tokenizer = model_parts(model, tokenizer)
    if tokenizer is None:
        raise ValueError(
            "export_to_gguf: a GGUF file carries its tokenizer; pass tokenizer= (a "
            "GemmaTokenizer) with a backbone, or export the GemmaCausalLM."
        )
    generation = generation_of(backbone)
    _check_query_scaling(generation, backbone)
    file_types = {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                  "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    table = gguf_tensor_table(backbone)
    with atomic_file(path) as staging:
        writer = gguf.GGUFWriter(staging, generation)
        try:
            writer.add_name(name or "Gemma")
            writer.add_file_type(file_types[dtype])
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            _write_architecture(writer, gguf, generation, backbone)
            _write_tokenizer(writer, tokenizer)
            for count, (variable, tensor_name, _, to_gguf) in enumerate(table, 1):
                data, kind = _encode(gguf, to_gguf(to_numpy_value(variable, tensor_name)), dtype)
                writer.add_tensor(tensor_name, data, raw_dtype=kind)
                if progress:
                    progress(f"encoding tensor {count}/{len(table)} ({dtype})")
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    return os.path.abspath(os.fspath(path))
