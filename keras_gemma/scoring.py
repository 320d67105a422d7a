"""Per-token scores of given token ids: the logits, or the loss against target ids.

`GemmaCausalLM.score` is KerasHub's method of that name; this module holds its body so that
causal_lm.py stays about generation and training.
"""

import math

import keras
from keras import ops

SCORING_MODES = ("logits", "loss")


def score_tokens(
    backbone,
    token_ids,
    padding_mask=None,
    scoring_mode="logits",
    layer_intercept_fn=None,
    target_ids=None,
):
    """Runs `token_ids` [batch, tokens] through `backbone` one block at a time.

    `layer_intercept_fn(x, index)` sees (and may replace) the activations: index -1 is the
    token embedding before its sqrt(hidden_dim) scaling, 0..num_layers-1 each decoder
    block's output. Unlike KerasHub 0.32, whose score() discards what the function returns
    at index -1, the returned value is used at every index, so an intervention on the
    embeddings takes effect.

    Returns logits [batch, tokens, vocabulary] ("logits") or the cross-entropy of each
    position's `target_ids` [batch, tokens] ("loss"; no reduction).

    Example:
    >>> losses = score_tokens(backbone, ids, mask, "loss", target_ids=ops.roll(ids, -1, 1))
    """
    if scoring_mode not in SCORING_MODES:
        raise ValueError(
            f"score(): scoring_mode must be one of {list(SCORING_MODES)}; got {scoring_mode!r}."
        )
    if scoring_mode == "loss" and target_ids is None:
        raise ValueError(
            'score(): scoring_mode="loss" needs target_ids, the token to score at each position '
            "(for next-token losses: keras.ops.roll(token_ids, shift=-1, axis=1))."
        )
    token_ids = ops.convert_to_tensor(token_ids)
    if len(token_ids.shape) != 2:
        raise ValueError(
            f"score(): token_ids must be [batch, tokens]; got shape {tuple(token_ids.shape)}."
        )
    if padding_mask is None:
        padding_mask = ops.ones_like(token_ids)
    padding_mask = ops.convert_to_tensor(padding_mask)
    if layer_intercept_fn is None:

        def layer_intercept_fn(x, index):
            return x

    x = layer_intercept_fn(backbone.token_embedding(token_ids), -1)
    x = x * ops.cast(math.sqrt(backbone.hidden_dim), x.dtype)
    for index, block in enumerate(backbone.transformer_layers):
        x = layer_intercept_fn(block(x, padding_mask=padding_mask), index)
    logits = backbone.token_embedding(backbone.final_normalization(x), reverse=True)
    if scoring_mode == "logits":
        return logits
    per_token = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    return per_token(ops.convert_to_tensor(target_ids), ops.cast(logits, "float32"))
