"""Rotary position embedding, as Gemma applies it (the two halves of each head rotate together).

The angles depend on the positions and the layer's RoPE settings only, so a cached call
computes the tables once (`rotary_tables`) and every layer with those settings applies them
(`apply_rotary`): a PyTorch decode step replays each op it records, per layer and per token.
"""

import numpy as np
from keras import ops


def rotary_tables(positions, head_dim, max_wavelength=10000.0, scaling_factor=1.0):
    """`(cos, sin)`, float32 [batch or 1, seq, 1, head_dim], for `apply_rotary`.

    Positions and frequencies are kept in float32 whatever the compute dtype: a bfloat16
    position has 8 bits of mantissa, so positions past 256 would collide.

    The tables cover the whole head: the angle of frequency i is repeated in both halves,
    and `sin` is negated in the first half, so that rotating is two products and a sum
    (see `apply_rotary`). The negation is exact, so the result is the textbook
    `first * cos - second * sin, second * cos + first * sin` to the bit.

    Args:
        positions: [seq] or [batch, seq] absolute positions.
        head_dim: the (even) width of each head.
        max_wavelength: the RoPE base (10,000 for local layers; Gemma 3 global layers use 1e6).
        scaling_factor: linear position interpolation; positions are divided by it.

    Example:
    >>> cos, sin = rotary_tables(ops.arange(4), head_dim=8)
    >>> cos.shape
    (1, 4, 1, 8)
    """
    half = head_dim // 2
    # Constants (numpy), so that a traced step does not recompute them at every call.
    exponents = np.arange(0, half, dtype="float32") * np.float32(2.0) / np.float32(head_dim)
    inverse_frequency = np.float32(1.0) / np.power(np.float32(max_wavelength), exponents)
    frequencies = np.concatenate([inverse_frequency, inverse_frequency])
    sign = np.concatenate([-np.ones(half, "float32"), np.ones(half, "float32")])
    positions = ops.cast(positions, "float32")
    if scaling_factor != 1.0:
        positions = positions / float(scaling_factor)
    if len(positions.shape) == 1:
        positions = ops.expand_dims(positions, 0)
    # angle[batch, seq, 1, head_dim], broadcast over heads.
    angle = ops.multiply(ops.expand_dims(ops.expand_dims(positions, -1), -2), frequencies)
    return ops.cos(angle), ops.multiply(ops.sin(angle), sign)


def apply_rotary(inputs, tables):
    """Rotates `inputs` [batch, seq, heads, head_dim] by `tables = rotary_tables(...)`.

    Computed in float32 and cast back to the input's dtype.

    Example:
    >>> x = ops.ones((1, 4, 2, 8))
    >>> apply_rotary(x, rotary_tables(ops.arange(4), 8)).shape
    (1, 4, 2, 8)
    """
    cos, sin = tables
    x = ops.cast(inputs, "float32")
    # [second, first]: with the signed sin table, x * cos + swapped * sin is
    # [first * cos - second * sin, second * cos + first * sin].
    swapped = ops.roll(x, x.shape[-1] // 2, axis=-1)
    return ops.cast(x * cos + swapped * sin, inputs.dtype)


def rotary_embedding(inputs, positions, max_wavelength=10000.0, scaling_factor=1.0):
    """Rotates `inputs` [batch, seq, heads, head_dim] by the angle of each position.

    Args:
        inputs: queries or keys, [batch, seq, heads, head_dim] with an even head_dim.
        positions: [seq] or [batch, seq] absolute positions.
        max_wavelength: the RoPE base.
        scaling_factor: linear position interpolation; positions are divided by it.

    Example:
    >>> x = ops.ones((1, 4, 2, 8))
    >>> rotary_embedding(x, ops.arange(4)).shape
    (1, 4, 2, 8)
    """
    tables = rotary_tables(positions, inputs.shape[-1], max_wavelength, scaling_factor)
    return apply_rotary(inputs, tables)
