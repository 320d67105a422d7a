"""The pieces of the decode loop that every step runner shares: logits from the tied
embedding, the output mask, compile keys, JAX's stateless jit, and torch's no_grad."""

import keras
from keras import ops

from keras_gemma.generation.sampler import is_stop_token
from keras_gemma.layers.decode_matmul import decode_matmul


def tied_logits(embedding, hidden):
    """float32 logits [batch, vocabulary] for one position `hidden` [batch, 1, hidden_dim].

    `embedding(hidden, reverse=True)` multiplies by the transposed (vocabulary, hidden)
    table, the form XLA runs slowest in float32 (gemma_2b_en's head: 110 ms a token against
    ~75 ms for `decode_matmul`); a quantized table keeps the layer's own path.
    """
    if embedding.quantization_mode is not None or embedding.reverse_dtype is not None:
        return ops.cast(embedding(hidden, reverse=True)[:, 0, :], "float32")
    dtype = embedding.compute_dtype
    rows = ops.cast(ops.reshape(hidden, (-1, hidden.shape[2])), dtype)
    logits = decode_matmul(rows, ops.cast(embedding.embeddings, dtype))
    if embedding.logit_soft_cap is not None:
        cap = embedding.logit_soft_cap
        logits = ops.multiply(ops.tanh(ops.divide(logits, cap)), cap)
    return ops.cast(logits, "float32")


def output_mask(tokens, prompt_mask, end, stop_ids):
    """The prompt, then generated tokens up to and including each row's first stop token."""
    positions = ops.arange(tokens.shape[1], dtype="int32")[None, :]
    generated = ops.logical_and(ops.less(positions, end), ops.logical_not(prompt_mask))
    stops = ops.cast(ops.logical_and(generated, is_stop_token(tokens, stop_ids)), "int32")
    after_stop = ops.greater(ops.cumsum(stops, axis=1) - stops, 0)
    return ops.logical_and(ops.logical_or(prompt_mask, generated), ops.logical_not(after_stop))


def sampler_key(sampler):
    """What identifies a sampler's compiled program: the sampler is baked into it."""
    config = sampler.get_config()
    settings = sorted((k, repr(v)) for k, v in config.items() if k != "seed")
    key = (type(sampler).__name__, tuple(settings))
    if not type(sampler).__module__.startswith("keras_gemma.generation."):
        # A user's sampler may keep settings its config does not list (KerasHub's custom
        # sampler example keeps forbidden tokens in an attribute): the object itself is the
        # key, held by the program cache so that its id is never reused.
        key += (sampler,)
    return key


def jax_stateless_jit(model, function):
    """`jax.jit(function)` reading the model's weights from arguments, not as constants."""
    import jax

    def stateless(trainable, non_trainable, *arguments):
        mapping = list(zip(model.trainable_variables, trainable))
        mapping += list(zip(model.non_trainable_variables, non_trainable))
        with keras.StatelessScope(state_mapping=mapping):
            return function(*arguments)

    compiled = jax.jit(stateless)

    def run(*arguments):
        return compiled(
            [v.value for v in model.trainable_variables],
            [v.value for v in model.non_trainable_variables],
            *arguments,
        )

    return run


class no_grad:
    """`torch.no_grad()` on the torch backend, nothing elsewhere."""

    def __enter__(self):
        if keras.backend.backend() == "torch":
            import torch

            self._context = torch.no_grad()
            self._context.__enter__()

    def __exit__(self, *exc):
        if keras.backend.backend() == "torch":
            self._context.__exit__(*exc)
