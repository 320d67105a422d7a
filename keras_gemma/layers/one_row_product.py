"""A product of one row by a matrix, written as a multiply and a sum for Inductor to compile.

In the Inductor-compiled decode step (generation/torch_compiled_step.py), a batch-1 product
`x [1, in] @ W.T` with W [out, in] is recorded as the operator `keras_gemma::one_row_product`,
which Inductor decomposes into `(x * W).sum(in)` (times the int8 scales, `as_reduction`;
`register_with_inductor`)
and turns into one vectorized loop of its own that streams W once, both threads splitting
the rows. That loop reads memory faster than the library kernels the traced step calls
(measured on the 2-core AMD EPYC with AVX-512 of 2026-12-06, torch 2.13, 2 threads, ms per
product, each kernel read from memory):

    W [out, in]                   library kernel                  this form, compiled
    262144 x 640 (270M logits)
        float32                   oneDNN linear      12.1           9.0
        bfloat16                  F.linear           14.9           7.1
        int8, per-row scales      _weight_int8pack_mm 5.0           3.4
    the 270M's block products, float32 / bfloat16 / int8, 36 distinct matrices in turn:
        4096 x 640                0.191 / 0.196 / 0.078          0.223 / 0.124 / 0.072
        640 x 2048                0.200 / 0.102 / 0.041          0.129 / 0.067 / 0.046
        1536 x 640                0.098 / 0.074 / 0.027          0.095 / 0.054 / 0.035

(the compiled figures include a Python call each, which the compiled step does not pay).
With several rows the library kernels win (8 rows of the logits: bfloat16 13.3 against
43.5 ms; the loop reads W once per row), so only one row is rewritten. End to end (the
real Gemma 3 270M, A/B in one process): bfloat16 44.9 -> 67.7 tok/s, int8 (every product)
92.9 -> 131.8 (tied logits only: 115.4), float32 30.5 -> 39.0. Eagerly the form would build
the whole [1, out, in] product: only Inductor gets it, and the traced step keeps the
library kernels.

Example:
>>> with inductor_recording.on():
...     if one_row_product.applies(rows, kernel):
...         logits = one_row_product.product(rows, kernel)
"""

import functools
import typing

from keras_gemma.layers import inductor_recording


def applies(rows, kernel):
    """Whether `rows` [rows, in] @ `kernel` [out, in].T is recorded as a reduction: one row,
    a row-major kernel on the CPU, while a decode step is recorded for Inductor."""
    return (
        inductor_recording.is_on()
        and len(rows.shape) == 2
        and rows.shape[0] == 1
        and len(kernel.shape) == 2
        and kernel.device.type == "cpu"
        and kernel.is_contiguous()
    )


def product(rows, kernel, scale=None):
    """float32 `(rows @ kernel.T) * scale` for `rows` [1, in], `kernel` [out, in] of any
    dtype and `scale` [out] or None, recorded as the operator `keras_gemma::one_row_product`,
    which the compiled step's Inductor call replaces by `as_reduction` (`decompositions`).

    The recording (make_fx, real tensors) runs the operator once: it multiplies blocks of
    the kernel's rows, never holding a float32 copy of the whole kernel or the [1, out, in]
    terms of `as_reduction` (the 270M's logits: 1.3 GB more at the recording's peak).

    Example:
    >>> product(torch.ones(1, 4), torch.ones(3, 4, dtype=torch.int8), torch.ones(3)).shape
    torch.Size([1, 3])
    """
    return _operator()(rows, kernel, scale)


def as_reduction(rows, kernel, scale=None):
    """`product` as an element-wise product and a sum over `in`: what Inductor compiles."""
    import torch

    # `as_strided` makes Inductor store the row in float32 before the loop: otherwise it
    # inlines whatever made the row (the final norm, a bfloat16 round trip) into the loop,
    # recomputed for each of the kernel's rows (the 270M's bfloat16 logits took 13.9 ms, not
    # 7; an int8 kernel with a bfloat16 row is not vectorized at all: 14 ms against 3.6).
    rows = rows.to(torch.float32)
    rows = torch.as_strided(rows, rows.shape, rows.stride())
    terms = rows[:, None, :] * kernel.to(torch.float32)[None, :, :]
    result = terms.sum(dim=-1)
    if scale is not None:
        result = result * scale.to(torch.float32)
    return result


def decompositions():
    """`{operator: as_reduction}`."""
    import torch

    _operator()  # registers the operator
    return {torch.ops.keras_gemma.one_row_product.default: as_reduction}


def register_with_inductor():
    """Adds `decompositions()` to Inductor's own table, which every Inductor compile reads
    (it concerns only graphs holding this operator). Passing a table to `compile_fx`
    instead works too, but makes Inductor bypass its on-disk graph cache: the table holds
    functions it cannot key."""
    from torch._inductor import decomposition

    decomposition.decompositions.update(decompositions())


# Kernel rows multiplied at a time when the operator runs eagerly (32 MB of float32 at 640
# inputs a row).
EAGER_BLOCK_ROWS = 1 << 14


@functools.lru_cache(maxsize=None)
def _operator():
    import torch

    @torch.library.custom_op("keras_gemma::one_row_product", mutates_args=())
    def one_row_product(
        rows: torch.Tensor, kernel: torch.Tensor, scale: typing.Optional[torch.Tensor]
    ) -> torch.Tensor:
        row = rows.to(torch.float32)
        result = torch.empty((rows.shape[0], kernel.shape[0]), dtype=torch.float32)
        for start in range(0, kernel.shape[0], EAGER_BLOCK_ROWS):
            block = kernel[start:start + EAGER_BLOCK_ROWS].to(torch.float32)
            result[:, start:start + EAGER_BLOCK_ROWS] = row @ block.T
        return result if scale is None else result * scale.to(torch.float32)

    @one_row_product.register_fake
    def _(rows, kernel, scale):
        return rows.new_empty((rows.shape[0], kernel.shape[0]), dtype=torch.float32)

    return one_row_product
