"""`inputs @ kernel.T` for decode steps, written in the form each backend runs fastest on CPU.

Every dense kernel in keras_gemma is stored (out, in), as in PyTorch, transformers and GGUF.
A decode step multiplies a few rows by each kernel, so it is a matrix-vector product bound by
memory bandwidth, and how fast it runs depends on the exact formulation (measured on the
2-core EPYC of FACTS.md, gemma_2b_en's feed-forward, batch 1, whole FFN in one jax.jit):

- XLA float32: `(W @ x.T).T` 14.2 ms; `x @ W.T` 85 ms (the down projection, in > out,
  falls to ~2 GB/s); a (in, out) kernel with `x @ W` 16.7 ms.
- XLA bfloat16: XLA's CPU dot has no bfloat16 kernel; it converts the weight to float32
  as part of the product, and only some forms fuse that conversion well. `x @ W.T` with an
  explicit transpose does (17-37 GB/s of bfloat16 read alone, out >= in); a `dot_general`
  contracting both last axes does not (~1 GB/s); for in > out the sum of (out x out) chunks
  keeps the good form: 16 ms for the FFN, against 122 ms for a (in, out) kernel. So bfloat16
  runs at float32 speed here, not twice it (see generator.py for what it does to memory).
- PyTorch: torch's default float32 matrix-vector product (MKL) runs on one thread
  whatever `torch.set_num_threads` says, and reads a (out, in) matrix with short rows fastest
  stored column-major (`lay_out_for_decode`); oneDNN's (`torch.ops.mkldnn._linear_pointwise`)
  reads it row-major and uses every thread: the 270M's 262144 x 640 logits 23.5 -> 11.7 ms at
  2 threads on the AVX-512 EPYC of 2026-12-06 (~57 GB/s), the same at one thread. So float32
  kernels of at least 1 MiB go through oneDNN where torch_product_choice says it is faster
  (then no kernel is laid out column-major), everything else through one `F.linear`. The
  projections that read the same rows share one product (shared_rows.py).
"""

import functools
import math

import keras
from keras import ops

from keras_gemma.layers import one_row_product


def decode_matmul(inputs, kernel):
    """`inputs @ kernel.T` for `inputs` [rows, in] and `kernel` [out, in].

    Example:
    >>> decode_matmul(keras.ops.ones((1, 4)), keras.ops.ones((3, 4))).shape
    (1, 3)
    """
    backend = keras.backend.backend()
    if backend == "torch" and one_row_product.applies(inputs, kernel):
        # Recorded for the Inductor-compiled step: one row reads the kernel fastest in a loop
        # Inductor writes itself (one_row_product.py).
        return one_row_product.product(inputs, kernel).to(inputs.dtype)
    if backend == "torch" and _onednn_takes(inputs, kernel):
        from keras_gemma.layers.torch_onednn_product import linear_outside_autograd

        return linear_outside_autograd(inputs, kernel)
    if backend == "torch" and inputs.dtype == kernel.dtype:
        import torch

        # One op in the traced step where the form below records three; as fast or faster
        # in every case timed (2 threads, 2026-12-06: 384 x 256 5.8 vs 6.6 us, the 270M's
        # column-major logits 24.2 ms both, bfloat16 logits 11.1 vs 10.9 ms).
        return torch.nn.functional.linear(inputs, kernel)
    if backend == "torch" or keras.backend.standardize_dtype(kernel.dtype) == "float32":
        return ops.transpose(ops.matmul(kernel, ops.transpose(inputs)))
    out_features, in_features = kernel.shape
    if in_features <= out_features or in_features % out_features or not xla_runs_on_cpu():
        return ops.matmul(inputs, ops.transpose(kernel))
    chunk = out_features
    total = None
    for start in range(0, in_features, chunk):
        part = ops.matmul(
            inputs[:, start : start + chunk], ops.transpose(kernel[:, start : start + chunk])
        )
        total = part if total is None else total + part
    return total


ONEDNN_SMALLEST_KERNEL_BYTES = 1 << 20


def _onednn_takes(inputs, kernel):
    """Whether a torch decode product goes through oneDNN: float32 on a CPU where it is
    measured faster (torch_product_choice.onednn_decode_is_faster), the kernel row-major and
    of at least 1 MiB. A oneDNN call costs ~8.5 us more than torch's default product beyond
    reading the weight (2 threads, this CPU, 2026-12-06: 16 x 640 10.6 vs 2.1 us; 256 x 640
    cache-resident 16.4 vs 8.7 us), which a small weight does not win back."""
    import torch

    from keras_gemma.layers import torch_product_choice

    return (
        kernel.numel() * kernel.element_size() >= ONEDNN_SMALLEST_KERNEL_BYTES
        and kernel.dtype == torch.float32
        and inputs.dtype == torch.float32
        and kernel.device.type == "cpu"
        and kernel.is_contiguous()
        and not (torch.is_grad_enabled() and kernel.requires_grad)  # not differentiable
        and torch_product_choice.onednn_decode_is_faster()
    )


def lay_out_for_decode(variable, input_axes, compute_dtype):
    """On torch on a CPU, stores a float32 kernel [outputs..., inputs...] whose outputs
    outnumber its inputs with the input axes outermost in memory; shape and values unchanged.

    torch's float32 matrix-vector product (MKL) reads a (out, in) matrix with short rows
    slowly in row-major memory, whichever way the product is written (`W @ x.T`, `x @ W.T`,
    `F.linear`, `mv`); the same matrix stored column-major (memory (in, out)) runs as fast
    as XLA's. Measured on this 2-core AVX2 EPYC (torch 2.13, one thread, batch 1, distinct
    matrices so that none is cache-resident; ms per product, row-major -> column-major;
    2026-12-01, machine shared):

        262144 x 640 (270M logits)  58.3 -> 31.5   1024 x 640 (270M query)  0.21 -> 0.18
        2048 x 640 (270M gating)    0.42 -> 0.29   16384 x 2048 (2B gating)  7.3 -> 6.6
        640 x 2048 (270M down)      0.28 -> 0.38   256 x 640 (270M key)      0.06 -> 0.07
        2048 x 16384 (2B down)      6.4  -> 7.1    2048 x 2048              1.35 -> 1.37

    So only kernels with more outputs than inputs change. bfloat16 is left alone: its
    column-major product is 25x slower (262144 x 640: 56 -> 1370 ms), and so is a float32
    kernel computed in another dtype (mixed_bfloat16 casts it per call, keeping the strides).
    End to end, the real Gemma 3 270M decodes 1.31x faster (float32, 1 thread, interleaved
    A/B, same greedy ids). Prefill and training products (`einsum`, `matmul` with many rows)
    take either memory order. Loading assigns into the variable, so weights read from a
    checkpoint land in this order without a second copy; the one copy made here is of the
    freshly initialized value, at build time.

    Example:
    >>> lay_out_for_decode(embedding.embeddings, input_axes=1, compute_dtype="float32")
    """
    if keras.backend.backend() != "torch":
        return
    import torch

    from keras_gemma.layers import torch_product_choice

    value = getattr(variable, "_value", None)
    if value is None or value.dtype != torch.float32 or value.device.type != "cpu":
        return
    if torch_product_choice.onednn_decode_is_faster():
        return  # oneDNN reads row-major weights fastest (see `decode_matmul`)
    if keras.backend.standardize_dtype(compute_dtype) != "float32":
        return
    shape = tuple(value.shape)
    outputs = shape[: len(shape) - input_axes]
    if not outputs or math.prod(outputs) <= math.prod(shape[len(outputs):]):
        return
    order = tuple(range(len(outputs), len(shape))) + tuple(range(len(outputs)))
    inverse = tuple(order.index(axis) for axis in range(len(shape)))
    with torch.no_grad():
        # `.data` keeps the Parameter object that Keras and torch.nn.Module track.
        value.data = value.data.permute(*order).contiguous().permute(*inverse)


def is_decode_step(dense, inputs):
    """True for one token per row through a float kernel: the case `decode_matmul` serves.

    Prefill, training and Keras' quantized modes keep `dense(inputs)`.
    """
    return (
        dense.quantization_mode is None
        and inputs.shape[1] == 1
        and inputs.shape[0] is not None
    )


@functools.lru_cache(maxsize=None)
def xla_runs_on_cpu():
    """True where the JAX or TensorFlow backend computes on the CPU (no GPU or TPU in sight).

    The 16-bit forms here and the block-by-block decoding of 16-bit weights on JAX
    (generator.py) work around XLA's CPU dot, which has no bfloat16 kernel; an accelerator's
    dot has one, and there the plain forms and one compiled loop are the fast ones.

    Example:
    >>> xla_runs_on_cpu()  # JAX or TensorFlow on a machine without an accelerator
    True
    """
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return jax.default_backend() == "cpu"
    if backend == "tensorflow":
        import tensorflow as tf

        return not (tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU"))
    return False


def int8_decode_matmul(inputs, int8_kernel, inverse_scale):
    """`(inputs @ int8_kernel.T) * inverse_scale` on XLA (JAX, TensorFlow) on a CPU:
    `inputs` [rows, in] float, `int8_kernel` [out, in] int8, `inverse_scale` [out].

    XLA's CPU backend has no fused int8-weight product. Measured on this 2-core EPYC (JAX,
    one jitted product, batch 1, weights [out, in]; GB/s of int8 read; 2026-12-01):

        weights [out, in]            2048x640   640x2048   16384x2048   2048x16384
        float32 (W @ x.T).T          37 GB/s*   36 GB/s*   21 (f32 B)   25 (f32 B)
        Keras: einsum(x, W int8)/s   3.2        5.2        0.34         0.53
        x @ f32(W).T * (1/s)  <-     11.4       9.8        10.8         0.46
        (f32(W) @ x.T).T * (1/s)     4.3        4.7        0.29         0.56
        int8 x int8 dot, row scales  4.3        4.5        0.31         0.39
        bfloat16 x @ W.T             0.6        0.6        0.8          0.2 (0.9 chunked)
        (* cache-resident: the small matrices are re-read from cache)
    The 270M's tied logits, 262144x640 (measured while a test suite ran on the machine):
    Keras' form 647 ms (0.26 GB/s), `x @ f32(W).T` 21.7 ms (7.7 GB/s), bfloat16 276 ms.

    The int8 -> float32 conversion fuses into the product in the `x @ W.T` form when
    out >= in: half the float32 time (16384x2048: 3.1 ms against 6.4 ms). No form does when
    in > out and W is large (2048x16384: 60-73 ms against 5.4 ms in float32, a fixed XLA
    loop order; chunking the inputs as `decode_matmul` does for bfloat16 makes it worse,
    190 ms); the 270M's in > out products are small (640x2048, 256x640, 640x1024).

    Example:
    >>> int8_decode_matmul(keras.ops.ones((1, 4)), keras.ops.ones((3, 4), "int8"),
    ...                    keras.ops.ones((3,))).shape
    (1, 3)
    """
    kernel = ops.cast(int8_kernel, "float32")
    product = ops.matmul(ops.cast(inputs, "float32"), ops.transpose(kernel))
    return ops.cast(ops.multiply(product, ops.cast(inverse_scale, "float32")), inputs.dtype)
