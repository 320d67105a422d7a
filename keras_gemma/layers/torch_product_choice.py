"""Which form of a training product is fastest on this CPU under PyTorch: measured, not assumed.

The same torch build multiplies at very different speeds on the CPUs this project has run
on, and the fastest form changed with the CPU (GFLOP/s, torch 2.13, 2 threads, the 2B
shape's 128 x 2048 -> 16384 product):

                                      AVX2 EPYC (2026-12-01)   AVX-512 + BF16 EPYC (2026-12-05)
    float32, torch's default (MKL)    39 (1 thread)            171
    float32, oneDNN                   -                        441
    bfloat16 forward, native          6.6 (1 thread)           808
    bfloat16 input gradient, native   0.1 (1 thread)           617
    bfloat16 via float32 arithmetic   47 (1 thread)            91

(MKL runs its AVX2 code on AMD CPUs even where they have AVX-512; oneDNN does not. Without
AVX-512 BF16, torch's bfloat16 product with an untransposed weight has no fast kernel.)
So each choice below times its candidates once per process, on a [512, 1024] x [1024, 1024]
product (a few milliseconds), and takes the faster form only when it is at least 1.2x
faster. The environment variables force a choice: `KERAS_GEMMA_TORCH_ONEDNN` (float32
through oneDNN) and `KERAS_GEMMA_TORCH_NATIVE_16BIT` (16-bit products in their own dtype),
each "1" or "0".

Example:
>>> onednn_float32_is_faster()  # True on the AVX-512 EPYC above, False on the AVX2 one
"""

import functools
import os
import time

MARGIN = 1.2


def onednn_float32_is_faster():
    """Whether float32 products should go through oneDNN (torch_onednn_product.py)."""
    forced = _forced("KERAS_GEMMA_TORCH_ONEDNN")
    if forced is not None:
        return forced and onednn_available()
    return _onednn_measured()


def onednn_decode_is_faster():
    """Whether float32 decode products (one row times a weight read from memory) should go
    through oneDNN with the weight row-major, rather than torch's default product with wide
    weights stored column-major (decode_matmul.lay_out_for_decode).

    torch's default float32 matrix-vector product (MKL) runs on one thread whatever
    `torch.set_num_threads` says; oneDNN's uses them all. Measured on the AVX-512 EPYC of
    2026-12-06 (torch 2.13, batch 1, weights not cache-resident, ms per product):

                                 1 thread: MKL col-major / oneDNN   2 threads: MKL / oneDNN
        262144 x 640 (logits)    24.1 / 23.7                        23.5 / 11.7
        2048 x 640 (gating)      0.180 / 0.186                      0.204 / 0.083
        640 x 2048 (down)        0.228 / 0.169                      0.270 / 0.134
        1024 x 640 (query)       0.065 / 0.075                      0.077 / 0.031

    So the answer depends on the thread count. With one thread the two are as fast, a timing
    would pick either by chance, and the answer is no (torch's default, as before oneDNN was
    considered). With more, it is timed once per process, with the threads torch has when
    the first model is built (the memory order is chosen then), on a [16384, 640] product
    over weights larger than the last-level cache. `KERAS_GEMMA_TORCH_ONEDNN=1` or `0`
    decides instead, as for training products.
    """
    import torch

    forced = _forced("KERAS_GEMMA_TORCH_ONEDNN")
    if forced is not None:
        return forced and onednn_available()
    threads = torch.get_num_threads()
    return threads > 1 and _onednn_decode_measured(threads)


def native_sixteen_bit_is_fast(dtype):
    """Whether `dtype` ("bfloat16" or "float16") products should run in that dtype, rather
    than in float32 arithmetic (torch_sixteen_bit_training.py)."""
    forced = _forced("KERAS_GEMMA_TORCH_NATIVE_16BIT")
    if forced is not None:
        return forced
    return _native_measured(dtype)


def _forced(name):
    setting = os.environ.get(name, "").strip()
    return {"1": True, "0": False}.get(setting)


@functools.lru_cache(maxsize=None)
def onednn_available():
    """Whether this torch build has oneDNN's linear operator."""
    import torch

    try:
        torch.ops.mkldnn._linear_pointwise(torch.ones(2, 3), torch.ones(4, 3), None, "none", [], "")
    except (AttributeError, RuntimeError):
        return False
    return True


def _best_seconds(product):
    product()
    times = []
    for _ in range(3):
        started = time.perf_counter()
        product()
        times.append(time.perf_counter() - started)
    return min(times)


def _operands(dtype):
    import torch

    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(512, 1024, generator=generator).to(dtype)
    weight = torch.randn(1024, 1024, generator=generator).to(dtype)
    return inputs, weight


@functools.lru_cache(maxsize=None)
def _onednn_measured():
    if not onednn_available():
        return False
    import torch

    inputs, weight = _operands(torch.float32)
    default = _best_seconds(lambda: inputs @ weight.T)
    onednn = _best_seconds(lambda: torch.ops.mkldnn._linear_pointwise(
        inputs, weight, None, "none", [], ""))
    return default >= MARGIN * onednn


@functools.lru_cache(maxsize=None)
def _onednn_decode_measured(threads):
    if not onednn_available():
        return False
    import torch

    # Four distinct 42 MB weights, so that every product reads its weight from memory; the
    # values do not matter to the speed (filled, not random: randn would take ~0.5 s).
    row_major = [torch.full((16384, 640), 0.01 * (i + 1)) for i in range(4)]
    column_major = [w.t().contiguous().t() for w in row_major]
    inputs = torch.full((1, 640), 0.5)

    def each(product, weights):
        return lambda: [product(w) for w in weights]

    default = _best_seconds(each(lambda w: w @ inputs.T, column_major))
    onednn = _best_seconds(each(
        lambda w: torch.ops.mkldnn._linear_pointwise(inputs, w, None, "none", [], ""), row_major))
    return default >= MARGIN * onednn


@functools.lru_cache(maxsize=None)
def _native_measured(dtype):
    import torch

    inputs, weight = _operands(getattr(torch, dtype))
    # The input gradient's form (weight not transposed): the slow one where it is slow.
    native = _best_seconds(lambda: inputs @ weight)
    widened = _best_seconds(lambda: (inputs.float() @ weight.float()).to(inputs.dtype))
    return widened >= MARGIN * native
