"""GPTQ for one weight matrix: int4 values in groups, rounding errors pushed onto the inputs
not yet rounded.

Round-to-nearest int4 rounds every weight on its own. GPTQ (Frantar et al., 2022, "GPTQ:
Accurate Post-Training Quantization for Generative Pre-trained Transformers") rounds the
input columns of W [out, in] one at a time and, after each, corrects the columns still to
come so that the layer's outputs on calibration inputs X move as little as possible: with
H = X^T X / n, the error of column j, divided by the Cholesky factor of H^-1 at (j, j), is
subtracted from the later columns times that factor's row j. Columns are processed in blocks
so that most of the correction is one matrix product.

The grid is Keras' grouped int4 (int4_kernel.py): for each group of `group_size` inputs and
each output, value = (q - zero) * scale, q and zero integers in [-8, 7]. Each group's
scale is chosen when GPTQ reaches the group's first column, from the weights as corrected so
far, by trying shrunken [min, max] ranges (`grid`): clipping a few outliers of a group
rounds the rest more finely.

Example:
>>> values, scale, zero = gptq_int4(weights, hessian, group_size=32)
>>> dequantized = (values - np.repeat(zero, 32, axis=0).T) * np.repeat(scale, 32, axis=0).T
"""

import numpy as np

# Fractions of a group's [min, max] range tried for its scale (the one with the smallest
# squared error wins). On the real Gemma 3 270M with GPTQ, value/FFN-down in int8, ~2,000
# calibration tokens: perplexity 24.94 with this search, float32 24.49.
RANGE_FRACTIONS = np.linspace(1.0, 0.6, 9)
BLOCK_COLUMNS = 128


def _grid_for(weights, symmetric, fraction):
    """Scale and zero [out] for a group's weights [out, g], its range shrunk by `fraction`."""
    if symmetric:
        scale = np.maximum(np.abs(weights).max(axis=1) * fraction / 7.0, 1e-10)
        return scale, np.zeros_like(scale)
    low = weights.min(axis=1) * fraction
    high = weights.max(axis=1) * fraction
    scale = np.maximum(high - low, 1e-10) / 15.0
    zero = np.clip(np.round(-low / scale) - 8.0, -8.0, 7.0)
    return scale, zero


def _rounded(weights, scale, zero):
    """`(q, dequantized)` of weights [out, ...] on the grid (scale, zero) [out]."""
    scale = scale.reshape(scale.shape + (1,) * (weights.ndim - 1))
    zero = zero.reshape(scale.shape)
    values = np.clip(np.round(weights / scale) + zero, -8.0, 7.0)
    return values, (values - zero) * scale


def grid(weights, symmetric=False):
    """The group grid `(scale, zero)` [out] with the smallest squared error on `weights`
    [out, g] among `RANGE_FRACTIONS`."""
    best_scale = best_zero = best_error = None
    for fraction in RANGE_FRACTIONS:
        scale, zero = _grid_for(weights, symmetric, fraction)
        error = np.square(_rounded(weights, scale, zero)[1] - weights).sum(axis=1)
        if best_error is None:
            best_scale, best_zero, best_error = scale, zero, error
            continue
        better = error < best_error
        best_scale = np.where(better, scale, best_scale)
        best_zero = np.where(better, zero, best_zero)
        best_error = np.where(better, error, best_error)
    return best_scale, best_zero


def gptq_int4(weights, hessian, group_size=32, symmetric=False, damping=0.01,
              activation_order=False):
    """GPTQ of `weights` [out, in] given `hessian` = X^T X / n [in, in] of its inputs.

    Returns `(values, scale, zero)`: int8 values in [-8, 7] [out, in], and float32 scale
    and zero [in / group_size, out] (Keras' int4 `kernel_scale` / `kernel_zero` layout,
    transposed kernels aside). `in` must be a multiple of `group_size`. `damping` times the
    mean of H's diagonal is added to it, as in the paper (Keras' `hessian_damping`).

    `activation_order`: round the columns in decreasing order of H's diagonal (the inputs
    with the most energy first, while the most columns remain to absorb their error), with
    each group's grid chosen from the weights before any rounding ("static groups": a
    group's columns are no longer reached together, and the groups stay contiguous inputs).
    """
    weights = np.array(weights, dtype=np.float64)
    hessian = np.array(hessian, dtype=np.float64)
    outputs, inputs = weights.shape
    if inputs % group_size:
        raise ValueError(
            f"GPTQ groups of {group_size} inputs do not divide this layer's {inputs} inputs; "
            f"choose a group_size that divides {inputs} (32 or 64 for Gemma)."
        )
    # Inputs that calibration never exercised: nothing to preserve, their weights round plainly.
    dead = np.diag(hessian) == 0
    hessian[dead, dead] = 1.0
    hessian[np.diag_indices(inputs)] += damping * np.mean(np.diag(hessian))

    scales = np.zeros((inputs // group_size, outputs))
    zeros = np.zeros_like(scales)
    if activation_order:
        for group in range(inputs // group_size):
            columns = slice(group * group_size, (group + 1) * group_size)
            scales[group], zeros[group] = grid(weights[:, columns], symmetric)
        order = np.argsort(-np.diag(hessian), kind="stable")
        weights, hessian = weights[:, order], hessian[np.ix_(order, order)]
    else:
        order = np.arange(inputs)
    # Upper Cholesky factor of H^-1: row j holds how column j's error spreads to later ones.
    inverse_factor = np.linalg.cholesky(np.linalg.inv(hessian)).T

    values = np.zeros((outputs, inputs), np.int8)
    for start in range(0, inputs, BLOCK_COLUMNS):
        stop = min(start + BLOCK_COLUMNS, inputs)
        block = weights[:, start:stop].copy()
        errors = np.zeros_like(block)
        factor = inverse_factor[start:stop, start:stop]
        for offset in range(stop - start):
            column = order[start + offset]
            group = column // group_size
            if not activation_order and column % group_size == 0:
                # The group's grid from its weights as corrected so far (natural order).
                upcoming = np.concatenate(
                    [block[:, offset:], weights[:, stop:column + group_size]], axis=1
                )[:, :group_size]
                scales[group], zeros[group] = grid(upcoming, symmetric)
            rounded, dequantized = _rounded(block[:, offset], scales[group], zeros[group])
            values[:, column] = rounded
            error = (block[:, offset] - dequantized) / factor[offset, offset]
            block[:, offset:] -= np.outer(error, factor[offset, offset:])
            errors[:, offset] = error
        weights[:, stop:] -= errors @ inverse_factor[start:stop, stop:]
    return values, scales.astype(np.float32), zeros.astype(np.float32)
