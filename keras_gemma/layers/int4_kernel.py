"""Keras' int4 EinsumDense variables for kernels stored (out, in), laid out by contraction.

Keras' int4 EinsumDense flattens its kernel to a matrix [rows, columns] = [contracted axes,
other axes] with a *reshape*, which is a transpose only for kernels stored (in, out). Ours
are stored (out, in) (decode_matmul.py), so the reshape mixes inputs with outputs: Keras'
"per output channel" scale then covers weights of many output channels, and its groups of
`block_size` "input positions" hold weights `out` elements apart. Its call reshapes back,
so the products are consistent, but the quantization is much coarser than it claims (the
real Gemma 3 270M's perplexity: see GemmaEinsumDense).

Here the same variables, with Keras' names, shapes and formulas, hold the kernel transposed
to [contracted, other] first, so that rows are true input positions and columns true
output channels:

- `_kernel`: int8 [rows, ceil(columns / 2)], two int4 values a byte along the columns
  (`keras.quantizers.pack_int4(values, axis=-1)`);
- per channel (`block_size` None): `kernel_scale` [columns], value = q / scale;
- grouped (Keras' default): `kernel_scale` and `kernel_zero` [rows / block_size, columns],
  value = (q - zero) * scale, with q, zero in [-8, 7] (Keras'
  `abs_max_quantize_grouped_with_zero_point`).

For a 2-D kernel W [out, in] this is simply W.T, which is also what a matrix-vector kernel
that wants [out, in] reads back with one transpose (quantized_products.py).
"""

import numpy as np
from keras import ops
from keras import quantizers


def contraction_order(layer, ndim):
    """The kernel's axes with the contracted ones first: transposing by it gives the
    [rows, columns] layout above (after a reshape)."""
    reduced = list(layer._kernel_reduced_axes)
    return reduced + [axis for axis in range(ndim) if axis not in reduced]


def quantize(layer, kernel, block_size):
    """`(packed, scale, zero)` for the float `kernel` (numpy, the layer's kernel shape);
    `zero` is None per channel."""
    order = contraction_order(layer, kernel.ndim)
    shape = kernel.shape
    rows = int(np.prod([shape[axis] for axis in layer._kernel_reduced_axes]))
    flat = np.transpose(np.asarray(kernel, "float32"), order).reshape(rows, -1)
    if block_size is None or block_size == -1:
        values, scale = quantizers.abs_max_quantize(
            flat, axis=0, value_range=(-8, 7), dtype="int8", to_numpy=True
        )
        scale, zero = ops.squeeze(scale, axis=0), None
    else:
        values, scale, zero = quantizers.abs_max_quantize_grouped_with_zero_point(
            flat, block_size=block_size, to_numpy=True
        )
    packed, _, _ = quantizers.pack_int4(values, axis=-1)
    return packed, scale, zero


def unpacked(layer, packed=None):
    """The int4 values as int8 [rows, columns] (in [-8, 7])."""
    packed = layer._kernel if packed is None else packed
    return quantizers.unpack_int4(packed, layer._int4_unpacked_column_size, axis=-1, dtype="int8")


def dequantized_flat(layer, dtype, packed=None, scale=None, zero=None):
    """The float kernel as [rows, columns]."""
    values = ops.cast(unpacked(layer, packed), dtype)
    scale = ops.cast(layer.kernel_scale if scale is None else scale, dtype)
    if getattr(layer, "_int4_block_size", None) in (None, -1):
        return ops.divide(values, scale)
    zero = ops.cast(layer.kernel_zero if zero is None else zero, dtype)
    block_size = layer._int4_block_size
    rows = values.shape[0]
    groups = scale.shape[0]
    # Each group's scale and zero repeated over its rows (a broadcast, not a gather).
    grouped = ops.reshape(ops.pad(values, ((0, groups * block_size - rows), (0, 0))),
                          (groups, block_size, -1))
    result = (grouped - zero[:, None, :]) * scale[:, None, :]
    return ops.reshape(result, (groups * block_size, -1))[:rows]


def to_kernel_shape(layer, flat):
    """[rows, columns] back to the layer's kernel shape and axis order."""
    shape = layer.original_kernel_shape
    order = contraction_order(layer, len(shape))
    permuted = ops.reshape(flat, [shape[axis] for axis in order])
    return ops.transpose(permuted, np.argsort(order).tolist())
