"""Tiny random keras_gemma causal LMs of each generation, for the export tests.

Built by keras_gemma itself (the side under test), with random norms too (zero norms would
hide a wrong 1 + w convention) and the session's SentencePiece model (1,000 pieces).
"""

import numpy as np
from conftest import tiny_config

from keras_gemma import GemmaBackbone, GemmaCausalLM, GemmaCausalLMPreprocessor, GemmaTokenizer

VOCAB = 1000
WINDOW = 4  # shorter than the test sequences, so local layers really are local
# Non-default settings wherever a format has a key for them, so a dropped key shows.
ARCHITECTURES = {
    "gemma": tiny_config(vocabulary_size=VOCAB),
    "gemma2": tiny_config(
        vocabulary_size=VOCAB, num_layers=3, use_post_attention_norm=True,
        use_post_ffw_norm=True, attention_logit_soft_cap=4.0, final_logit_soft_cap=3.0,
        use_sliding_window_attention=True, sliding_window_size=WINDOW),
    "gemma3": tiny_config(
        vocabulary_size=VOCAB, num_layers=6, use_post_attention_norm=True,
        use_post_ffw_norm=True, use_query_key_norm=True, use_sliding_window_attention=True,
        sliding_window_size=WINDOW, sliding_window_pattern=6, local_rope_max_wavelength=10000.0,
        global_rope_max_wavelength=1e6, global_rope_scaling_factor=8.0),
}


def randomize(backbone, seed=0):
    rng = np.random.default_rng(seed)
    for variable in backbone.weights:
        std = 0.3 if "norm" in variable.path else 0.15
        variable.assign(rng.normal(0, std, variable.shape).astype("float32"))
    return backbone


def causal_lm(generation, proto_path, seed=0, **overrides):
    """A tiny `GemmaCausalLM` of `generation` ("gemma", "gemma2", "gemma3"), float32."""
    arguments = {**ARCHITECTURES[generation], **overrides}
    backbone = randomize(GemmaBackbone(**arguments, dtype="float32"), seed)
    preprocessor = GemmaCausalLMPreprocessor(GemmaTokenizer(proto=proto_path), sequence_length=16)
    return GemmaCausalLM(backbone, preprocessor, compile=False)


def batch(length=11, seed=7):
    """Two rows of random ids; the second is right-padded by 3."""
    rng = np.random.default_rng(seed)
    token_ids = rng.integers(4, VOCAB, size=(2, length)).astype("int32")
    padding_mask = np.ones_like(token_ids)
    padding_mask[1, -3:] = 0
    token_ids[1, -3:] = 0
    return token_ids, padding_mask


def logits(backbone, token_ids, padding_mask):
    import keras

    hidden = backbone({"token_ids": token_ids, "padding_mask": padding_mask})
    values = backbone.token_embedding(hidden, reverse=True)
    return np.asarray(keras.ops.convert_to_numpy(keras.ops.cast(values, "float32")))


def transformers_logits(model, token_ids, padding_mask):
    import torch

    with torch.no_grad():
        output = model(input_ids=torch.tensor(token_ids, dtype=torch.long),
                       attention_mask=torch.tensor(padding_mask, dtype=torch.long))
    return output.logits.float().numpy()


def transformers_model(generation, seed=0):
    """transformers' own tiny model of `generation`, with the shapes of ARCHITECTURES (so
    JAX reuses the compiled ops) and what a GGUF file can state: query scaling by head_dim."""
    import torch
    import transformers

    arguments = ARCHITECTURES[generation]
    common = dict(vocab_size=VOCAB, hidden_size=arguments["hidden_dim"],
                  intermediate_size=arguments["intermediate_dim"] // 2,
                  num_attention_heads=arguments["num_query_heads"],
                  num_key_value_heads=arguments["num_key_value_heads"],
                  head_dim=arguments["head_dim"], num_hidden_layers=arguments["num_layers"],
                  rms_norm_eps=1e-6)
    if generation == "gemma2":
        config = transformers.Gemma2Config(
            query_pre_attn_scalar=arguments["head_dim"], sliding_window=WINDOW,
            attn_logit_softcapping=4.0, final_logit_softcapping=3.0, **common)
        model_class = transformers.Gemma2ForCausalLM
    elif generation == "gemma3":
        config = transformers.Gemma3TextConfig(
            query_pre_attn_scalar=arguments["head_dim"], sliding_window=WINDOW,
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0},
            }, **common)
        model_class = transformers.Gemma3ForCausalLM
    else:
        config, model_class = transformers.GemmaConfig(**common), transformers.GemmaForCausalLM
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.normal_(0.0, 0.3 if "norm" in name else 0.15)
    return model
