"""Products with Keras' int8 and int4 variables through PyTorch's packed CPU kernels.

Keras' own int8/int4 calls on torch dequantize the whole kernel to float on every call (its
torch einsum takes no int8 operand), so a decode step writes and reads the float kernel
again: slower than the float model. PyTorch has fused weight-only kernels for CPU:

- `aten._weight_int8pack_mm(x [M, K], w int8 [N, K], scales [N])` = x @ (w * scales).T;
- `aten._weight_int4pack_mm_for_cpu(x [M, K], packed, group, scales_and_zeros [K/g, N, 2])`
  = x @ ((q - 8) * scale + zero).T for q in 0..15, with `packed` made once by
  `aten._convert_weight_to_int4pack_for_cpu(q int32 [N, K], 1)` (N a multiple of 16, group
  32, 64, 128 or 256).

Keras' variables map onto them without a copy of the int8 weights: an int8 kernel stored
(out, in) is already w [N, K] (a reshape); the tied embedding [vocabulary, hidden] is w for
the logits; Keras' scale divides where the kernel multiplies (so scales = 1 / scale), and
its grouped int4 value (q - zero) * scale is ((q + 8) - 8) * scale + (-zero * scale).
What the kernels need that Keras does not store (reciprocal scales, the packed int4 layout)
is made once and kept on the layer (`prepared`), not as a variable, and made again when a
variable it came from changes (new tensor or in-place write).

The kernels want bfloat16 activations on this CPU (2-core EPYC with avx512_bf16; torch
2.13; batch 1; weights [N, K]; ms per product, one thread / two threads; 2026-12-01, the
two-thread run with the machine otherwise idle):

    weights [N, K]                int8 x f32   int8 x bf16      int4/32 x f32   int4/32 x bf16
    2048 x 640                    1.26 / 0.63  0.114 / 0.065    2.57 / 1.30     0.185 / 0.096
    640 x 2048                    1.27 / 0.63  0.112 / 0.060    2.58 / 1.29     0.188 / 0.099
    262144 x 640 (270M logits)    172 / 100    41.8 / 16.0      348 / 166       24.5 / 12.9
    16384 x 2048                  36.5 / 17.3  4.4 / 1.9        85.5 / 35.5     5.2 / 2.4
    (float32 `W @ x.T`: 0.12 ms, 0.11 ms, 52 / 48 ms, 10.8 / 6.7 ms)

With float32 activations both kernels read ~1 GB/s of int8 (0.3-0.5 GB/s of int4): slower
than the float32 product. With bfloat16 they read 11-22 GB/s of int8 (int4: 3.4-7 GB/s,
the same weights a second), so the rows go in as bfloat16 and come out as bfloat16, cast
back to the layer's dtype: the product is rounded to bfloat16 (2^-8 relative), well under
int8's own rounding (real 270M int8 perplexity on torch: see quantization_defaults.py).
Groups of 64 run as fast as groups of 32 (within 5%).

On the same machine without AVX-512 (AVX2 only, 2026-12-01, one thread, machine shared) the
kernels are compute-bound and the int8 head lost its lead: 270M logits int8 x bf16 55 ms,
int4/64 x bf16 27 ms, float32 with its table column-major (decode_matmul.lay_out_for_decode)
31-39 ms, bfloat16 42 ms (int8 x f32 326 ms, int4 x f32 540 ms). An int4 logits head is then
the one low-bit head faster than float32 (quality: tests/test_real_gemma3_270m_quantized.py).

Used only for inference: on the torch backend, not training, without gradient, weight-only
(no activation quantizer), and for einsum equations that are a matrix product of the
inputs' trailing axes with a kernel stored (out, in), as all of keras_gemma's are. Anything
else keeps Keras' differentiable call (LoRA training, QLoRA).
"""

import keras
import numpy as np

from keras_gemma.layers import one_row_product

TORCH_INT4_GROUPS = (32, 64, 128, 256)


def matrix_form(equation):
    """`(batch axes, output axes)` counts when `equation` reads inputs [batch..., contracted...]
    against a kernel [output..., contracted...] into [batch..., output...]; else None.

    Example:
    >>> matrix_form("btnh,dnh->btd")
    (2, 1)
    """
    inputs, rest = equation.replace(" ", "").split(",")
    kernel, output = rest.split("->")
    if "." in equation:
        return None
    contracted = [c for c in inputs if c in kernel and c not in output]
    batch = [c for c in inputs if c not in kernel]
    outputs = [c for c in kernel if c not in inputs]
    if (
        inputs != "".join(batch + contracted)
        or kernel != "".join(outputs + contracted)
        or output != "".join(batch + outputs)
    ):
        return None
    return len(batch), len(outputs)


def torch_kernels_apply(inputs, training, weight_only=True):
    """Whether this call may use the packed kernels (see the module docstring)."""
    if keras.backend.backend() != "torch" or training or not weight_only:
        return False
    import torch

    if getattr(inputs, "device", None) is not None and inputs.device.type != "cpu":
        return False
    return not (torch.is_grad_enabled() and getattr(inputs, "requires_grad", False))


def prepared(layer, name, sources, make):
    """`make(*sources)`, kept on `layer` until one of the `sources` tensors changes.

    A change is a different tensor (a new variable value, or another one mapped in by a
    `StatelessScope`) or an in-place write (torch's version counter). The sources are held
    with the result, so their ids cannot be reused. Made with tracing paused: a decode step
    traced (or recorded by make_fx) records the result as a constant, not the packing
    (torch_step.TracedStep traces again when an int8 variable changes).
    """
    import torch

    key = tuple((id(t), t._version) for t in sources)
    cache = layer.__dict__.get("_prepared_products")
    if cache is None:
        cache = {}
        object.__setattr__(layer, "_prepared_products", cache)
    entry = cache.get(name)
    if entry is not None and entry[0] == key:
        return entry[2]
    from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing

    state = torch._C._get_tracing_state()
    torch._C._set_tracing_state(None)
    try:
        # make_fx (torch_compiled_step.py) records through dispatch modes, not the tracer.
        with torch.no_grad(), disable_proxy_modes_tracing():
            value = make(*[t.detach() for t in sources])
    finally:
        torch._C._set_tracing_state(state)
    cache[name] = (key, sources, value)
    return value


def int8_weights(layer, name, int8, scale, dtype):
    """`(w int8 [N, K], 1 / scale [N] in `dtype`)` for an int8 kernel `int8` [outputs...,
    inputs...] whose values are `int8 / scale` and `scale` one per output (Keras' int8
    kernels and embeddings)."""

    def make(int8, scale):
        inverse = (1.0 / scale.reshape(-1).double()).to(dtype)
        return int8.reshape(inverse.shape[0], -1), inverse

    return prepared(layer, f"{name}/int8/{dtype}", (int8, scale), make)


def int4_weights(layer, name, packed, unpack, scale, zero, dtype, groups_first):
    """`(packed for the kernel, group, scales_and_zeros)` for Keras int4 variables:
    `unpack(packed)` gives the values [N, K] in [-8, 7]; grouped `scale` and `zero`
    ([K / group, N] if `groups_first`, else [N, K / group]) mean (q - zero) * scale; per
    channel (`zero` None) `scale` [N] means q / scale, run as groups of 32 that share it."""
    import torch

    def make(packed, scale, zero=None):
        values = unpack(packed)
        n, k = values.shape
        kernel = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            (values.to(torch.int32) + 8).contiguous(), 1
        )
        if zero is None:
            group = 32
            scales = (1.0 / scale.double()).reshape(1, n).expand(k // group, n)
            offsets = torch.zeros_like(scales)
        else:
            if not groups_first:
                scale, zero = scale.T, zero.T
            group = k // scale.shape[0]
            scales = scale.double()
            offsets = -zero.double() * scales
        pairs = torch.stack([scales, offsets], dim=-1).to(dtype).contiguous()
        return kernel, group, pairs

    sources = (packed, scale) + ((zero,) if zero is not None else ())
    return prepared(layer, f"{name}/int4/{dtype}", sources, make)


def int8_supported(k):
    """Whether PyTorch's int8 CPU kernel takes rows of `k` inputs. Its AVX-512 code (torch
    2.13, the EPYC of 2026-12-05) reads 16 inputs at a time: with `k` not a multiple of 16 it
    crashed the process (several rows) or returned garbage (one row, e.g. 4e33); real Gemma
    sizes (256, 640, 1152, 2048, ...) are all multiples of 16."""
    return k % 16 == 0


def int4_supported(n, k, block_size):
    """Whether PyTorch's int4 CPU kernel takes an [n, k] matrix in groups of `block_size`
    (None or -1: per channel, run as groups of 32 sharing a scale)."""
    group = 32 if block_size in (None, -1) else block_size
    return n % 16 == 0 and group in TORCH_INT4_GROUPS and k % group == 0


def kernel_dtype(layer):
    """The torch dtype the kernels run in: bfloat16 for a float32 or bfloat16 layer (see
    KERNEL_SPEED), None for others (Keras' call then runs)."""
    import torch

    name = keras.backend.standardize_dtype(layer.compute_dtype)
    return torch.bfloat16 if name in ("float32", "bfloat16") else None


def on_rows(inputs, batch_axes, output_shape, product):
    """`product(x2d)` on `inputs` [batch..., contracted...] as bfloat16 rows [rows, K]; the
    result [rows, N] back in the inputs' dtype as [batch..., *output_shape]."""
    import torch

    batch_shape = tuple(inputs.shape[:batch_axes])
    rows = int(np.prod(batch_shape)) if batch_shape else 1
    out = product(inputs.reshape(rows, -1).to(torch.bfloat16).contiguous())
    return out.to(inputs.dtype).reshape(*batch_shape, *output_shape)


def int8_matmul(x2d, weights):
    """x2d [M, K] @ (w / scale).T through `_weight_int8pack_mm`."""
    import torch

    int8, inverse_scale = weights
    if one_row_product.applies(x2d, int8):
        # One row in the Inductor-compiled step (one_row_product.py); the result in the
        # kernel's dtype.
        return one_row_product.product(x2d, int8, inverse_scale).to(x2d.dtype)
    return torch.ops.aten._weight_int8pack_mm(x2d, int8, inverse_scale)


def int4_matmul(x2d, weights):
    """x2d [M, K] @ dequantized(w).T through `_weight_int4pack_mm_for_cpu`."""
    import torch

    packed, group, pairs = weights
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x2d, packed, group, pairs)
