"""bfloat16 / float16 products for training on PyTorch on a CPU, computed in float32.

Measured on this machine's CPU (AVX2, no AVX-512 BF16; torch 2.13, one thread), a 2B LoRA
step's shapes, 128 tokens x 2048 inputs x 16384 outputs:

    forward  x @ W.T     float32 219 ms (39 GFLOP/s)    bfloat16  1,308 ms (6.6 GFLOP/s)
    backward g @ W       float32 182 ms (47 GFLOP/s)    bfloat16 57,982 ms (0.1 GFLOP/s)

torch's bfloat16 product with the weight not transposed in memory (the input gradient) has
no fast kernel here: one bfloat16 LoRA step of the gemma_2b_en shape ran over 25 minutes.
Here each product converts its operands to float32, multiplies, and rounds the result to
the 16-bit dtype (what a bfloat16 product does, accumulating in float32); the backward pass
converts the saved 16-bit tensors again, so no float32 copy of a weight outlives its
product. The tied logits do it a block of the vocabulary at a time (the 2B table is 1 GB
in bfloat16, 2.1 GB in float32).

Inference keeps Keras' call (its decode paths are measured separately, see
decode_matmul.py); only training on a CPU comes here, and only where torch_product_choice.py
finds the native 16-bit product slower (on the AVX-512 BF16 EPYC of 2026-12-05 it is 6.8x
faster than this detour, and the layers keep Keras' own call).
"""

import keras
from keras import ops

from keras_gemma.layers import torch_product_choice
from keras_gemma.layers.torch_int8_training import backward_equation


def runs_here(kernel, training):
    """True when a 16-bit `kernel`'s training product should come here."""
    if not training or keras.backend.backend() != "torch":
        return False
    dtype = keras.backend.standardize_dtype(kernel.dtype)
    if dtype not in ("bfloat16", "float16"):
        return False
    if ops.convert_to_tensor(kernel).is_cuda:
        return False
    # A CPU with fast 16-bit products (AVX-512 BF16) keeps them: torch_product_choice.py.
    return not torch_product_choice.native_sixteen_bit_is_fast(dtype)


def kernel_gradient_equation(equation):
    """The einsum from `equation`'s inputs and output gradient to its kernel's gradient.

    Example:
    >>> kernel_gradient_equation("btd,fd->btf")
    'btd,btf->fd'
    """
    inputs, rest = equation.replace(" ", "").split(",")
    kernel, output = rest.split("->")
    return f"{inputs},{output}->{kernel}"


def float32_einsum(equation, inputs, kernel):
    """`einsum(equation, inputs, kernel)` computed in float32, the result in `inputs.dtype`.

    Example:
    >>> x = keras.ops.ones((1, 3, 4), "bfloat16")
    >>> w = keras.ops.ones((8, 4), "bfloat16")
    >>> float32_einsum("btd,fd->btf", x, w).dtype
    torch.bfloat16
    """
    return _functions()[0].apply(inputs, kernel, equation)


def float32_logits(hidden, table, rows=8192):
    """`hidden @ table.T` computed in float32 `rows` rows of the table at a time, forward
    and backward, the result in `hidden.dtype`.

    Example:
    >>> h = keras.ops.ones((1, 3, 4), "bfloat16")
    >>> float32_logits(h, keras.ops.ones((10, 4), "bfloat16"), rows=3).shape
    torch.Size([1, 3, 10])
    """
    return _functions()[1].apply(hidden, table, rows)


def _functions():
    import torch

    if "functions" in _CACHE:
        return _CACHE["functions"]

    class Float32Einsum(torch.autograd.Function):
        @staticmethod
        def forward(ctx, inputs, kernel, equation):
            ctx.save_for_backward(inputs, kernel)
            ctx.equation = equation
            return torch.einsum(equation, inputs.float(), kernel.float()).to(inputs.dtype)

        @staticmethod
        def backward(ctx, gradient):
            inputs, kernel = ctx.saved_tensors
            gradient = gradient.float()
            inputs_gradient = kernel_gradient = None
            if ctx.needs_input_grad[0]:
                inputs_gradient = torch.einsum(
                    backward_equation(ctx.equation), gradient, kernel.float()
                ).to(inputs.dtype)
            if ctx.needs_input_grad[1]:
                kernel_gradient = torch.einsum(
                    kernel_gradient_equation(ctx.equation), inputs.float(), gradient
                ).to(kernel.dtype)
            return inputs_gradient, kernel_gradient, None

    class Float32Logits(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, table, rows):
            ctx.save_for_backward(hidden, table)
            ctx.rows = rows
            wide = hidden.float()
            return torch.cat([
                (wide @ table[start:start + rows].float().T).to(hidden.dtype)
                for start in range(0, table.shape[0], rows)
            ], dim=-1)

        @staticmethod
        def backward(ctx, gradient):
            hidden, table = ctx.saved_tensors
            wide = hidden.float().reshape(-1, hidden.shape[-1])
            hidden_gradient = None
            table_gradients = []
            for start in range(0, table.shape[0], ctx.rows):
                block = gradient[..., start:start + ctx.rows].float()
                if ctx.needs_input_grad[0]:
                    piece = block @ table[start:start + ctx.rows].float()
                    hidden_gradient = piece if hidden_gradient is None else hidden_gradient + piece
                if ctx.needs_input_grad[1]:
                    flat = block.reshape(-1, block.shape[-1])
                    table_gradients.append((flat.T @ wide).to(table.dtype))
            if hidden_gradient is not None:
                hidden_gradient = hidden_gradient.to(hidden.dtype)
            table_gradient = torch.cat(table_gradients) if table_gradients else None
            return hidden_gradient, table_gradient, None

    _CACHE["functions"] = (Float32Einsum, Float32Logits)
    return _CACHE["functions"]


_CACHE = {}
