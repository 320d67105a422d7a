"""Rotary position embedding, as Gemma applies it (the two halves of each head rotate together)."""

from keras import ops


def rotary_embedding(inputs, positions, max_wavelength=10000.0, scaling_factor=1.0):
    """Rotates `inputs` [batch, seq, heads, head_dim] by the angle of each position.

    Positions and frequencies are kept in float32 whatever the compute dtype: a bfloat16
    position has 8 bits of mantissa, so positions past 256 would collide.

    Args:
        inputs: queries or keys, [batch, seq, heads, head_dim] with an even head_dim.
        positions: [seq] or [batch, seq] absolute positions.
        max_wavelength: the RoPE base (10,000 for local layers; Gemma 3 global layers use 1e6).
        scaling_factor: linear position interpolation; positions are divided by it.

    Example:
    >>> x = ops.ones((1, 4, 2, 8))
    >>> rotary_embedding(x, ops.arange(4)).shape
    (1, 4, 2, 8)
    """
    head_dim = inputs.shape[-1]
    half = head_dim // 2
    exponents = ops.arange(0, half, dtype="float32") * 2.0 / head_dim
    inverse_frequency = 1.0 / ops.power(float(max_wavelength), exponents)
    positions = ops.cast(positions, "float32") / float(scaling_factor)
    # angle[..., seq, half]
    angle = ops.expand_dims(positions, -1) * inverse_frequency
    if len(angle.shape) == 2:
        angle = ops.expand_dims(angle, 0)
    # broadcast over heads: [batch, seq, 1, half]
    angle = ops.expand_dims(angle, -2)
    cos = ops.cos(angle)
    sin = ops.sin(angle)
    x = ops.cast(inputs, "float32")
    first, second = x[..., :half], x[..., half:]
    rotated = ops.concatenate(
        [first * cos - second * sin, second * cos + first * sin], axis=-1
    )
    return ops.cast(rotated, inputs.dtype)
