"""Weight-only int8 products for training on PyTorch that keep the int8 weights, not float copies.

Keras' int8 product, differentiated by torch's autograd, dequantizes the kernel to float and
hands that float copy to the product, which saves it for the backward pass: an int8 + LoRA
step on the gemma_2b_en shape saved a float32 copy of every kernel (10 GB for 2.5 GB of
int8). Here a `torch.autograd.Function` saves the int8 kernel and its scale and dequantizes
again in the backward pass, so one float kernel is alive at a time. The tied logits do the
same a block of the vocabulary at a time: the 2B table is 0.5 GB in int8 and 2.1 GB in
float32, and dequantizing it whole (forward, then again for the gradient) was the largest
transient of the step.

Numbers: the forward products are Keras' own expressions (the kernel dequantized as
`int8 / scale`; the logits divided by the row scale after the product); the input gradients
are the same products transposed. The int8 weights and scales get no gradient (frozen).
"""

import threading

import keras
from keras import ops

from keras_gemma.layers import quantized_products
from keras_gemma.layers import torch_onednn_product


def backward_equation(equation):
    """The einsum that takes `equation`'s output gradient and kernel to its inputs' gradient
    (`equation` reads inputs against a kernel, no axis summed within the inputs alone).

    Example:
    >>> backward_equation("btd,fd->btf")
    'btf,fd->btd'
    """
    inputs, rest = equation.replace(" ", "").split(",")
    kernel, output = rest.split("->")
    if any(axis not in kernel + output for axis in inputs):
        raise ValueError(f"{equation}: an inputs axis is summed alone; no transposed product.")
    return f"{output},{kernel}->{inputs}"


def int8_einsum(equation, inputs, kernel, scale, dtype):
    """`einsum(equation, inputs, cast(kernel, dtype) / scale)` with `scale` already
    broadcast against the int8 `kernel`; the backward pass dequantizes again.

    Example:
    >>> x = keras.ops.ones((1, 3, 4))
    >>> w = keras.ops.ones((8, 4), "int8")
    >>> int8_einsum("btd,fd->btf", x, w, keras.ops.ones((8, 1)), "float32").shape
    torch.Size([1, 3, 8])
    """
    return _functions()[0].apply(inputs, kernel, scale, equation, dtype)


def int8_logits(hidden, table, row_scale, soft_cap=None, rows=8192):
    """`hidden @ cast(table).T / row_scale` (then `soft_cap * tanh(logits / soft_cap)` if
    set), `rows` rows of the table dequantized at a time, forward and backward.

    Example:
    >>> h = keras.ops.ones((1, 3, 4))
    >>> table = keras.ops.ones((10, 4), "int8")
    >>> int8_logits(h, table, keras.ops.ones((10,)), rows=3).shape
    torch.Size([1, 3, 10])
    """
    return _functions()[1].apply(hidden, table, row_scale, soft_cap, rows)


def float_copy(kernel, dtype):
    """`kernel` (int8) converted to `dtype` in a buffer this thread reuses: valid until the
    next call. A fresh 134 MB float copy of a 2B feed-forward kernel took 32 ms, mostly the
    first touch of new pages; converting into a reused buffer 4.3 ms (torch 2.13, 2 threads).
    The training products here need one float kernel at a time, so one buffer (the largest
    kernel's size) serves them all.

    Example:
    >>> float_copy(keras.ops.ones((8, 4), "int8"), torch.float32).shape
    torch.Size([8, 4])
    """
    import torch

    if torch.compiler.is_compiling():  # a traced program allocates its own
        return kernel.to(dtype)
    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    buffer = buffers.get(dtype)
    if buffer is None or buffer.numel() < kernel.numel():
        buffer = buffers[dtype] = torch.empty(kernel.numel(), dtype=dtype)
    copy = buffer[: kernel.numel()].view(kernel.shape)
    copy.copy_(kernel)
    return copy


_SCRATCH = threading.local()


def _functions():
    import torch

    if "functions" in _CACHE:
        return _CACHE["functions"]

    def dequantized(kernel, scale, dtype):
        return ops.divide(ops.cast(kernel, dtype), scale)

    def onednn(equation, dtype):
        # oneDNN where it multiplies `dtype` faster than torch's default (torch_onednn_product.py).
        return (
            torch_onednn_product.supports(equation)
            and torch_onednn_product.suits(keras.backend.standardize_dtype(dtype))
        )

    def onednn_logits(hidden):
        # The tied logits "btd,vd->btv" through oneDNN, for [batch, seq, hidden] rows.
        return hidden.dim() == 3 and onednn("btd,vd->btv", hidden.dtype)

    def output_scale(equation, kernel, scale):
        # The per-output-channel scale in the output's trailing shape: dividing the product
        # (rows x outputs) costs far less than dividing the kernel (outputs x inputs; in the
        # 2B int8 + LoRA step those divisions took 3 of its 14 seconds).
        output_axes = quantized_products.matrix_form(equation)[1]
        return scale.reshape(kernel.shape[:output_axes])

    class Int8Einsum(torch.autograd.Function):
        @staticmethod
        def forward(ctx, inputs, kernel, scale, equation, dtype):
            ctx.save_for_backward(kernel, scale)
            ctx.equation, ctx.dtype = equation, dtype
            if onednn(equation, inputs.dtype):
                product = torch_onednn_product.einsum_without_gradient(
                    equation, inputs, float_copy(kernel, inputs.dtype))
                return product / output_scale(equation, kernel, scale).to(inputs.dtype)
            return ops.einsum(equation, inputs, dequantized(kernel, scale, dtype))

        @staticmethod
        def backward(ctx, gradient):
            kernel, scale = ctx.saved_tensors
            if onednn(ctx.equation, gradient.dtype):
                scaled = gradient / output_scale(ctx.equation, kernel, scale).to(gradient.dtype)
                inputs_gradient = torch_onednn_product.einsum_input_gradient(
                    ctx.equation, scaled, float_copy(kernel, gradient.dtype))
            else:
                float_kernel = ops.cast(dequantized(kernel, scale, ctx.dtype), gradient.dtype)
                inputs_gradient = ops.einsum(
                    backward_equation(ctx.equation), gradient, float_kernel)
            return inputs_gradient, None, None, None, None

    def block_logits(hidden, table, row_scale, start, stop):
        block = float_copy(table[start:stop], hidden.dtype)
        if onednn_logits(hidden):
            product = torch_onednn_product.einsum_without_gradient("btd,vd->btv", hidden, block)
        else:
            product = ops.matmul(hidden, ops.transpose(block))
        return ops.divide(product, row_scale[start:stop])

    class Int8Logits(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, table, row_scale, soft_cap, rows):
            vocabulary = table.shape[0]
            logits = torch.cat([
                block_logits(hidden, table, row_scale, start, min(start + rows, vocabulary))
                for start in range(0, vocabulary, rows)
            ], dim=-1)
            if soft_cap is not None:
                logits = ops.multiply(ops.tanh(ops.divide(logits, soft_cap)), soft_cap)
            ctx.save_for_backward(table, row_scale, logits if soft_cap is not None else None)
            ctx.soft_cap, ctx.rows = soft_cap, rows
            return logits

        @staticmethod
        def backward(ctx, gradient):
            table, row_scale, capped = ctx.saved_tensors
            if ctx.soft_cap is not None:  # d(cap * tanh(z / cap)) / dz = 1 - (logits / cap)^2
                gradient = gradient * (1.0 - ops.square(capped / ctx.soft_cap))
            hidden_gradient = None
            vocabulary = table.shape[0]
            for start in range(0, vocabulary, ctx.rows):
                stop = min(start + ctx.rows, vocabulary)
                scaled = ops.divide(gradient[..., start:stop], ops.cast(
                    row_scale[start:stop], gradient.dtype))
                block = float_copy(table[start:stop], gradient.dtype)
                if onednn_logits(gradient):
                    piece = torch_onednn_product.einsum_input_gradient("btd,vd->btv", scaled, block)
                else:
                    piece = ops.matmul(scaled, block)
                hidden_gradient = piece if hidden_gradient is None else hidden_gradient + piece
            return hidden_gradient, None, None, None, None

    _CACHE["functions"] = (Int8Einsum, Int8Logits)
    return _CACHE["functions"]


_CACHE = {}
