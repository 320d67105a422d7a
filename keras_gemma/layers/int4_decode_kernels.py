"""int4 kernels for decoding under XLA on a CPU (JAX): dequantized once per `generate()` call.

XLA's CPU backend has no 4-bit product, nor a grouped one. Inside a decode step every form of
Keras' grouped int4 kernel tried is slower than the float32 kernel it stands for (JAX, the
real Gemma 3 270M's 90 int4 projections with distinct random values, batch 1, a jitted loop
of steps, 2-core EPYC, 2026-12-06; ms a step):

    float32 [out, in], `(W @ x.T).T` (decode_matmul)                   6.0
    float32 [in, out], `x @ W`                                          7.0
    Keras' packed layout dequantized inside the step (int4_kernel)      11.2
    dequantized to bfloat16 [out, in] inside the step                   11.5
    int4 values held unpacked as int8, group scales fused in            15.8
    the same as a sum over groups                                       16.8 - 33.8

In one program for the whole loop (prefill and `lax.while_loop`, what int4 ran before) XLA
hoists the dequantization out of the loop instead, and the int8 tied table's conversion
with it: float32 copies of every weight, read in the [in, out] layout (gemma_2b_en int4:
3.2 tok/s in 21 GB peak).

So `generate()` and `stream()` dequantize each int4 projection once per call into a
bfloat16 [out, in] kernel (`dequantized`; float32 for steps of several rows,
`kernel_dtype`), and the jitted steps and the block-by-block prefill read those
(`provided`): one row rounded to bfloat16 too, several rows (a prefill) against the kernel
widened to float32 in the block's program. Everything else runs as for int8 weights (a step
per call, the int8 tied table converted inside its product). Decode tok/s of int4 against float32 in the same run (the real 270M:
`benchmarks/gemma3_270m.py --backends jax`; the 2B shape: two gemma_2b_en blocks, a
1,024-token vocabulary, ms a token; 2026-12-06):

    int4 decoded by                              270M tok/s           2B blocks ms
    the whole loop (before)                      33.95 vs 34.92  0.97x
    steps, float32 kernels                       46.1 vs 36.3    1.27x  19.2 vs 20.3
    steps, bfloat16 kernels, float32 rows        56.9 vs 39.0    1.46x  247 vs 20.3
    steps, bfloat16 kernels and rows (this)      58.8 vs 36.8    1.60x  18.2 vs 20.3

The int4 greedy continuation of the 270M was the same in all four. What it costs: the
kernels' values and the rows are rounded to bfloat16 (2^-9 relative each, far under int4's
own steps), as PyTorch's packed kernels round theirs (quantized_products.py), so the
product equals the float32 product of the int4 values only to bfloat16 rounding; and 2 bytes
a weight of the int4 projections for the length of the call (the 270M: 0.15 GB;
gemma_2b_en: 4 GB; twice that for several rows). At rest the model holds its int4
variables. gemma_2b_en in int4 (`benchmarks/generate.py --shapes 2b --dtypes int4`, one
run): batch 1 5.27 tok/s, batch 8 0.82 a row, 15.9 GB peak (batch 8's float32 kernels;
the whole loop before: 3.21 tok/s in 21 GB); float32 ran 5.36 at batch 1 in an earlier
run: level at this size, where bfloat16 kernels read slower per byte than float32 ones
(eight blocks: 73 against 61 ms a step).

Example:
>>> layers = eligible_layers(lm.backbone.transformer_layers[0])
>>> kernels = [dequantized(layer) for layer in layers]
>>> with provided(layers, kernels):
...     outputs = block(x, cache=cache, cache_update_index=index)
"""

import contextlib
import threading

import keras
from keras import ops

from keras_gemma.layers import int4_kernel
from keras_gemma.layers import quantized_products

_provided = threading.local()


def eligible_layers(layer):
    """The int4 dense layers under `layer` (itself included) that take a provided kernel,
    in a fixed order (layers of equal structure list theirs alike)."""
    return [
        sublayer for sublayer in layer._flatten_layers()
        if getattr(sublayer, "quantization_mode", None) == "int4"
        and hasattr(sublayer, "_xla_weight_only")  # a GemmaEinsumDense (reads `kernel_for`)
        and sublayer.inputs_quantizer is None
        and quantized_products.matrix_form(sublayer.equation) is not None
    ]


def kernel_dtype(rows):
    """The dtype of the kernels for steps of `rows` rows: bfloat16 for one (XLA reads it
    fast in `x @ W.T`), float32 for more, where XLA's bfloat16 products are slow (four
    gemma_2b_en blocks, 8 rows, ms a step: bfloat16 kernels 562, float32 kernels 104, the
    float32 model 96)."""
    return "bfloat16" if rows == 1 else "float32"


def dequantized(layer, dtype="bfloat16"):
    """The kernel [out, in] of an int4 layer in `eligible_layers`, in `dtype` (its inputs
    flattened: the layout `decode_matmul` reads fastest)."""
    flat = int4_kernel.dequantized_flat(layer, "float32")  # [in, out]
    return ops.transpose(ops.cast(flat, dtype))


@contextlib.contextmanager
def provided(layers, kernels):
    """Within the block, `kernel_for(layer)` gives `kernels[i]` for `layers[i]` (on this
    thread; meant for tracing a compiled step whose arguments the kernels are)."""
    if len(layers) != len(kernels):
        raise ValueError(f"{len(layers)} int4 layers, but {len(kernels)} kernels.")
    previous = getattr(_provided, "kernels", None)
    mapping = dict(previous or {})
    mapping.update({id(layer): kernel for layer, kernel in zip(layers, kernels)})
    _provided.kernels = mapping
    try:
        yield
    finally:
        _provided.kernels = previous


def kernel_for(layer):
    """The kernel provided for `layer`, or None."""
    mapping = getattr(_provided, "kernels", None)
    return None if mapping is None else mapping.get(id(layer))


def applies(backbone):
    """Whether JAX on a CPU should decode this model with provided kernels: some int4 dense
    layer, and every int4 layer one that takes them (an int4 embedding would be dequantized
    at every step)."""
    from keras_gemma.layers.decode_matmul import xla_runs_on_cpu

    if keras.backend.backend() != "jax" or not xla_runs_on_cpu():
        return False
    int4 = [layer for layer in backbone._flatten_layers()
            if getattr(layer, "quantization_mode", None) == "int4"]
    return bool(int4) and len(int4) == len(eligible_layers(backbone))
