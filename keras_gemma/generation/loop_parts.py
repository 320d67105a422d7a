"""The pieces of the decode loop that every step runner shares: logits from the tied
embedding, the output mask, compile keys, JAX's stateless jit, torch's no_grad, which
quantized models JAX decodes a step per call, and the Python loop's host reads."""

import keras
import numpy as np
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


def int8_weights_only(backbone):
    """Whether some weights are int8 (`quantize("int8")`) and none int4.

    XLA's CPU dot converts an int8 weight to float32, and the whole-loop program hoists
    those conversions out of the loop as it does for 16-bit weights. Measured
    (2026-12-06, JAX, batch 1, whole loop -> a step per call): real Gemma 3 270M int8
    38.2 -> 59.8 tok/s, peak RSS 2.29 -> 1.71 GB; gemma_2b_en shape int8 2.03 -> 1.28
    tok/s, 15.8 -> 6.2 GB. int4 weights take a step per call too, but only with their
    kernels dequantized once per call (int4_decode_kernels.py): a step that unpacks every
    int4 weight itself ran the 270M at 8.1 tok/s (37.4 in the whole loop, which holds
    every weight in float32 meanwhile: 2B int4 21 GB peak).
    """
    modes = {layer.quantization_mode for layer in backbone._flatten_layers()}
    return "int8" in modes and not modes - {"int8", None}


def all_true(values):
    """`bool(all(values))`, read on the host; torch's own calls where the backend is torch
    (each Keras op costs a few microseconds more, per decoded token)."""
    if keras.backend.backend() == "torch":
        return bool(values.all())
    return bool(ops.convert_to_numpy(ops.all(values)))


def scalar_int32(value):
    """`value` as an int32 scalar tensor of the backend (torch's own call on torch)."""
    if keras.backend.backend() == "torch":
        import torch
        from keras.src.backend.torch.core import get_device

        return torch.tensor(value, dtype=torch.int32, device=get_device())
    return ops.convert_to_tensor(np.int32(value))
