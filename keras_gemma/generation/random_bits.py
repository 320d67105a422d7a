"""Counter-based random numbers for sampling inside compiled decode loops.

Why not `keras.random` with a `SeedGenerator`: its state is a Keras variable, which has to be
threaded through `jax.jit` and `lax.while_loop` as loop state, assigned inside
`tf.function(jit_compile=True)`, and breaks `torch.compile` graphs. Here every random number
is a pure function of `(key, step, row, column)`: a 32-bit integer hash ("lowbias32", Chris
Wellons' hash-prospector, bias ~0.17 of an ideal hash) evaluated with int32 arithmetic, which
wraps identically in XLA, TensorFlow, PyTorch and NumPy. The loop carries nothing, and the
same key gives the same samples on every backend.
"""

import numpy as np
from keras import ops

# Multipliers of lowbias32 as two's-complement int32 values.
_M1 = int(np.array(0x7FEB352D, dtype=np.uint32).view(np.int32))
_M2 = int(np.array(0x846CA68B, dtype=np.uint32).view(np.int32))
_GOLDEN = int(np.array(0x9E3779B9, dtype=np.uint32).view(np.int32))


def _shift_right(x, bits):
    # Logical shift on int32: an arithmetic shift, then clear the copied sign bits.
    return ops.bitwise_and(ops.right_shift(x, bits), (1 << (32 - bits)) - 1)


def _mix(x):
    x = ops.bitwise_xor(x, _shift_right(x, 16))
    x = x * _M1
    x = ops.bitwise_xor(x, _shift_right(x, 15))
    x = x * _M2
    return ops.bitwise_xor(x, _shift_right(x, 16))


def uniform(key, step, shape):
    """Uniform floats in (0, 1) of `shape` [rows, columns], a pure function of the inputs.

    Args:
        key: int32 tensor [2], the sampler's key for this `generate()` call.
        step: int32 scalar, the decode position (so each step draws fresh numbers).
        shape: `(rows, columns)`; `rows` may be a dynamic (tensor) batch size.
    """
    rows, columns = shape
    key = ops.cast(key, "int32")
    seed = _mix(ops.bitwise_xor(_mix(key[0] + _GOLDEN), key[1]))
    seed = _mix(ops.bitwise_xor(seed, ops.cast(step, "int32") * _GOLDEN))
    row_seed = _mix(ops.bitwise_xor(seed, ops.arange(rows, dtype="int32") * _M1))
    counter = ops.arange(columns, dtype="int32")
    bits = _mix(_mix(ops.bitwise_xor(counter[None, :], row_seed[:, None])) + _GOLDEN)
    # The top 24 bits fill a float32 mantissa exactly; +0.5 keeps 0 and 1 out.
    top = ops.cast(_shift_right(bits, 8), "float32")
    return (top + 0.5) * (1.0 / (1 << 24))


def gumbel(key, step, shape):
    """Standard Gumbel noise: `argmax(logits + gumbel)` samples from `softmax(logits)`."""
    return -ops.log(-ops.log(uniform(key, step, shape)))
