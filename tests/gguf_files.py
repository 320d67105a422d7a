"""Tiny GGUF files written the way llama.cpp's convert_hf_to_gguf.py writes Gemma models.

A tiny random transformers model (Gemma, Gemma 2 or Gemma 3) is written with
`gguf.GGUFWriter`: llama.cpp's tensor names, norm weights stored as 1 + w, matrices in
(out, in) order, and a vocabulary taken from a SentencePiece model with llama.cpp's three
changes (`<unk>` and added tokens marked CONTROL, spaces instead of '▁' in user-defined
pieces). `reference_logits` is the independent side of the comparison: it reads the same
file with `gguf` itself, maps the tensors back onto the transformers model and runs it.
"""

import numpy as np

VOCAB = 1000
HIDDEN, HEADS, HEAD_DIM, FFN = 256, 2, 128, 512  # rows a multiple of 256 for K-quants
WINDOW = 4
LAYERS = {"gemma": 2, "gemma2": 2, "gemma3": 6}
# GGUF block name -> transformers layer name (Gemma 2/3; Gemma 1's ffn_norm differs).
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "ffn_norm": "pre_feedforward_layernorm", "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
# Bytes per 256-value K-quant block and the offsets of its float16 scales.
_K_BLOCKS = {"Q2_K": (84, (80, 82)), "Q3_K": (110, (108,)), "Q4_K": (144, (0, 2)),
             "Q5_K": (176, (0, 2)), "Q6_K": (210, (208,))}


def transformers_model(arch, seed=0, width=1):
    """A tiny random transformers model of `arch` ("gemma", "gemma2", "gemma3").

    `width` divides the hidden, head and FFN sizes (4: for quick runs; too small for
    K-quant blocks).
    """
    import torch
    import transformers

    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN // width,
                  intermediate_size=FFN // width,
                  num_attention_heads=HEADS, num_key_value_heads=1, head_dim=HEAD_DIM // width,
                  num_hidden_layers=LAYERS[arch], rms_norm_eps=1e-6)
    if arch == "gemma":
        config, cls = transformers.GemmaConfig(**common), transformers.GemmaForCausalLM
    elif arch == "gemma2":
        config = transformers.Gemma2Config(
            query_pre_attn_scalar=HEAD_DIM // width, sliding_window=WINDOW,
            attn_logit_softcapping=4.0,
            final_logit_softcapping=3.0, **common)
        cls = transformers.Gemma2ForCausalLM
    else:
        config = transformers.Gemma3TextConfig(
            query_pre_attn_scalar=HEAD_DIM // width, sliding_window=WINDOW,
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0},
            }, **common)
        cls = transformers.Gemma3ForCausalLM
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.normal_(0.0, 0.3 if "norm" in name else 0.05)
    return model


def _gguf_name(arch, name):
    name = name.removeprefix("model.")
    if name == "embed_tokens.weight":
        return "token_embd.weight"
    if name == "norm.weight":
        return "output_norm.weight"
    _, index, rest = name.split(".", 2)
    rest = rest.removesuffix(".weight")
    if arch == "gemma" and rest == "post_attention_layernorm":
        return f"blk.{index}.ffn_norm.weight"
    block = {value: key for key, value in _BLOCK_NAMES.items()}[rest]
    return f"blk.{index}.{block}.weight"


def llama_cpp_vocabulary(proto):
    """(tokens, scores, types) as llama.cpp stores a Gemma SentencePiece vocabulary."""
    from sentencepiece import sentencepiece_model_pb2

    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(proto)
    tokens, scores, types = [], [], []
    for piece in model.pieces:
        kind, text, score = piece.type, piece.piece, piece.score
        if kind == 2 or (kind == 4 and text.startswith("<") or text == "[@BOS@]"):
            kind, score = 3, -1000.0  # <unk> and the special added tokens become CONTROL
        elif kind == 4:
            text, score = text.replace("\u2581", " "), -1000.0
        elif kind == 3:
            score = -1000.0
        tokens.append(text)
        scores.append(score)
        types.append(kind)
    return tokens, scores, types


def _random_k_quant(shape, qtype, rng):
    """Random but valid K-quant blocks for a float matrix of `shape` (small scales)."""
    size, offsets = _K_BLOCKS[qtype]
    blocks = rng.integers(0, 256, size=(shape[0] * shape[1] // 256, size), dtype=np.uint8)
    for offset in offsets:
        scale = rng.uniform(2e-4, 1e-3, size=len(blocks)).astype(np.float16)
        blocks[:, offset:offset + 2] = scale.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(shape[0], -1)


def write_gguf(path, model, arch, proto, types=None, architecture_name=None, seed=0):
    """Writes `model` as a GGUF file; `types` maps GGUF tensor names (or "*") to a type name.

    K-quant types get random blocks (gguf cannot quantize to them); the reference then uses
    their dequantized values, as keras_gemma must.
    """
    import gguf

    types = types or {}
    rng = np.random.default_rng(seed)
    config = model.config
    writer = gguf.GGUFWriter(str(path), architecture_name or arch)
    writer.add_context_length(128)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if arch == "gemma3":
        writer.add_rope_freq_base(1e6)
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(8.0)
    else:
        writer.add_rope_freq_base(10000.0)
    if arch != "gemma":
        writer.add_sliding_window(config.sliding_window)
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
    tokens, scores, token_types = llama_cpp_vocabulary(proto)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(token_types)
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    writer.add_add_space_prefix(False)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied
        gguf_name = _gguf_name(arch, name)
        data = tensor.float().numpy()
        if gguf_name.endswith("norm.weight"):
            writer.add_tensor(gguf_name, (data + 1.0).astype(np.float32))
            continue
        qtype = types.get(gguf_name, types.get("*", "F32"))
        if qtype in _K_BLOCKS:
            writer.add_tensor(gguf_name, _random_k_quant(data.shape, qtype, rng),
                              raw_dtype=gguf.GGMLQuantizationType[qtype])
        elif qtype == "F32":
            writer.add_tensor(gguf_name, data)
        elif qtype == "IQ4_NL":  # a type keras_gemma refuses: random 18-byte blocks
            raw = rng.integers(0, 256, size=(data.shape[0], data.shape[1] // 32 * 18))
            writer.add_tensor(gguf_name, raw.astype(np.uint8),
                              raw_dtype=gguf.GGMLQuantizationType.IQ4_NL)
        else:
            kind = gguf.GGMLQuantizationType[qtype]
            writer.add_tensor(gguf_name, gguf.quants.quantize(data, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def reference_logits(model, arch, path, token_ids, padding_mask):
    """transformers' logits with every weight read from the GGUF file by `gguf` itself."""
    import gguf
    import torch

    reader = gguf.GGUFReader(str(path))
    stored = {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in reader.tensors}
    state = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        gguf_name = _gguf_name(arch, name)
        value = stored[gguf_name] - (1.0 if gguf_name.endswith("norm.weight") else 0.0)
        state[name] = torch.tensor(value.reshape(tensor.shape), dtype=torch.float32)
    model.load_state_dict(state, strict=False)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(token_ids, dtype=torch.long),
                       attention_mask=torch.tensor(padding_mask, dtype=torch.long)).logits
    return logits.float().numpy()
