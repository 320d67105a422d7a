"""Tiny KerasHub Gemma models, built by KerasHub itself, for side-by-side tests.

Each test that compares with KerasHub builds the reference here, randomizes its weights
(KerasHub's zero-initialized norms would hide layout mistakes) and, where it needs files,
saves it with KerasHub's own `save_to_preset`.
"""

import numpy as np
from conftest import tiny_config

TINY = tiny_config(vocabulary_size=1000, num_layers=3, head_dim=12)


def randomize(model, seed=0):
    """Normal random weights: std 0.3 for norm scales, 0.15 for everything else."""
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        std = 0.3 if "norm" in variable.path else 0.15
        variable.assign(rng.normal(0, std, variable.shape).astype(variable.dtype))


def keras_hub_backbone(generation, dtype="float32"):
    """KerasHub's GemmaBackbone ("gemma", "gemma2") or Gemma3Backbone ("gemma3"), tiny."""
    import keras_hub

    if generation == "gemma":
        return keras_hub.models.GemmaBackbone(**TINY, dtype=dtype)
    if generation == "gemma2":
        return keras_hub.models.GemmaBackbone(
            **TINY,
            use_post_ffw_norm=True,
            use_post_attention_norm=True,
            attention_logit_soft_cap=4.0,
            final_logit_soft_cap=3.0,
            use_sliding_window_attention=True,
            sliding_window_size=4,
            dtype=dtype,
        )
    # KerasHub's Gemma 3 counts intermediate_dim as the FFN width; 7 layers cover one
    # global layer (the 6th) and a local one after it.
    arguments = {**TINY, "intermediate_dim": 32, "num_layers": 7}
    return keras_hub.models.Gemma3Backbone(
        **arguments,
        image_size=16,
        vision_encoder=None,
        use_query_key_norm=True,
        use_post_ffw_norm=True,
        use_post_attention_norm=True,
        use_sliding_window_attention=True,
        sliding_window_size=4,
        dtype=dtype,
    )


def keras_hub_causal_lm(generation, proto, sequence_length=24, seed=1):
    """KerasHub's tiny (Gemma3)CausalLM on the SentencePiece model `proto`, randomized."""
    import keras_hub

    backbone = keras_hub_backbone(generation)
    randomize(backbone, seed=seed)
    if generation == "gemma3":
        tokenizer = keras_hub.models.Gemma3Tokenizer(proto=proto, has_vision_tokens=False)
        preprocessor = keras_hub.models.Gemma3CausalLMPreprocessor(
            tokenizer=tokenizer, sequence_length=sequence_length
        )
        return keras_hub.models.Gemma3CausalLM(backbone=backbone, preprocessor=preprocessor)
    tokenizer = keras_hub.models.GemmaTokenizer(proto=proto)
    preprocessor = keras_hub.models.GemmaCausalLMPreprocessor(
        tokenizer=tokenizer, sequence_length=sequence_length
    )
    return keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=preprocessor)
