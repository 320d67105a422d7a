"""Training products on PyTorch on a CPU through oneDNN, where it beats torch's default.

torch multiplies float32 matrices with MKL, and MKL runs its AVX2 code on AMD CPUs even
where they have AVX-512. oneDNN (also inside every torch CPU build, behind
`torch.ops.mkldnn._linear_pointwise`) uses AVX-512 there. Measured on the 2-core AMD EPYC of
2026-12-05 (AVX-512; torch 2.13, 2 threads), GFLOP/s:

    128 x 2048 -> 16384 (2B gating, forward)      MKL 171   oneDNN 441
    its input gradient (weight transposed)        MKL 163   oneDNN 394
    128 x 2048 -> 256000 (2B tied logits)         MKL 145   oneDNN 397
    the same table stored column-major            MKL 157   oneDNN 304
    2048 x 16384 x 2048                           MKL 232   oneDNN 453   (XLA here: 468)

On a CPU where MKL is as fast (Intel, or the AVX2-only EPYC of 2026-12-01) nothing is gained,
so torch_product_choice.py times both once per process and takes oneDNN only where it is at
least 1.2x faster (`KERAS_GEMMA_TORCH_ONEDNN=1` or `0` decides instead). bfloat16 and
float16 come here where their native products are fast (see `runs_here`).

Training products come here (forward, input and weight gradients, all in oneDNN), and so do
inference products of several rows (prefill, a forward pass): the real Gemma 3 270M's
512-token prefill on torch, 2 threads, 2026-12-06: float32 0.906 -> 0.579 s, bfloat16
0.394 -> 0.351 s. Decode steps keep decode_matmul.py's measured forms.
"""

import functools
import math

import keras

from keras_gemma.layers import inductor_recording
from keras_gemma.layers import quantized_products
from keras_gemma.layers import torch_product_choice


def runs_here(inputs, kernel, training):
    """True when a product of `inputs` with `kernel`, in training or of several rows (a
    prefill, a forward pass), should go through oneDNN: float32 where oneDNN beats MKL,
    bfloat16/float16 where the CPU multiplies them natively fast (torch_product_choice.py).
    For 16-bit kernels stored (out, in), torch's own einsum copies the transposed weight
    before every product (the 2B bfloat16 LoRA step: ~90 ms of copies per feed-forward
    product, 14 tok/s against KerasHub's 38); oneDNN's linear reads (out, in) as it is.
    A single row (a decode step's) keeps its own paths (decode_matmul.py)."""
    if keras.backend.backend() != "torch":
        return False
    if not training:
        rows = tuple(inputs.shape)[:-1]
        if any(size is None for size in rows) or math.prod(rows) <= 1:
            return False
    dtypes = {keras.backend.standardize_dtype(x.dtype) for x in (inputs, kernel)}
    if len(dtypes) != 1:
        return False
    if keras.ops.convert_to_tensor(kernel).device.type != "cpu":
        return False
    return suits(dtypes.pop())


def suits(dtype):
    """Whether CPU products in `dtype` should go through oneDNN here (see `runs_here`)."""
    if dtype == "float32":
        return torch_product_choice.onednn_float32_is_faster()
    if dtype in ("bfloat16", "float16"):
        return (
            torch_product_choice.onednn_available()
            and torch_product_choice.native_sixteen_bit_is_fast(dtype)
        )
    return False


def linear_outside_autograd(inputs, weight):
    """`inputs @ weight.T` through oneDNN, not differentiable: decode steps (under no_grad)
    and the insides of autograd Functions.

    Example:
    >>> linear_outside_autograd(torch.ones(1, 4), torch.ones(5, 4)).shape
    torch.Size([1, 5])
    """
    import torch

    if torch.compiler.is_compiling():
        # Traced by torch.compile (`jit_compile=True`): Inductor cannot lower this operator
        # with weights that are not constants, and it makes its own products.
        return torch.nn.functional.linear(inputs, weight)
    if inductor_recording.is_on():
        return _opaque_linear()(inputs, weight)
    if torch.jit.is_tracing():
        # torch.jit.trace cannot record the operator's empty `Scalar?[]` argument; a
        # TorchScript function can (torch_step.simplified inlines the call).
        return _scripted_linear()(inputs, weight)
    return torch.ops.mkldnn._linear_pointwise(inputs, weight, None, "none", [], "")


@functools.lru_cache(maxsize=None)
def _opaque_linear():
    import torch

    @torch.library.custom_op("keras_gemma::onednn_linear", mutates_args=())
    def onednn_linear(inputs: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(inputs, weight, None, "none", [], "")

    @onednn_linear.register_fake
    def _(inputs, weight):
        return inputs.new_empty(tuple(inputs.shape[:-1]) + (weight.shape[0],))

    return onednn_linear


@functools.lru_cache(maxsize=None)
def _scripted_linear():
    import torch

    source = (
        "def onednn_linear(inputs: Tensor, weight: Tensor) -> Tensor:\n"
        "    scalars: List[Optional[number]] = []\n"
        '    return torch.ops.mkldnn._linear_pointwise(inputs, weight, None, "none", scalars, "")\n'
    )
    return torch.jit.CompilationUnit(source).onednn_linear


def linear(inputs, weight):
    """`inputs @ weight.T` for `inputs` [rows, in] and `weight` [out, in], differentiable.

    Example:
    >>> linear(torch.ones(3, 4), torch.ones(5, 4)).shape
    torch.Size([3, 5])
    """
    return _function().apply(inputs, weight)


def einsum(equation, inputs, kernel):
    """`einsum(equation, inputs, kernel)` for a kernel [outputs..., inputs...] (our layout).

    Example:
    >>> einsum("btd,fd->btf", torch.ones(1, 3, 4), torch.ones(8, 4)).shape
    torch.Size([1, 3, 8])
    """
    return _matrix_call(equation, inputs, kernel, linear)


def einsum_without_gradient(equation, inputs, kernel):
    """`einsum` outside autograd, for the forward pass of another autograd Function."""
    return _matrix_call(equation, inputs, kernel, linear_outside_autograd)


def einsum_input_gradient(equation, gradient, kernel):
    """The inputs' gradient of `einsum(equation, inputs, kernel)` given the output's, outside
    autograd: `gradient @ kernel` over the kernel's output axes.

    Example:
    >>> einsum_input_gradient("btd,fd->btf", torch.ones(1, 3, 8), torch.ones(8, 4)).shape
    torch.Size([1, 3, 4])
    """
    batch_axes, output_axes = quantized_products.matrix_form(equation)
    batch_shape = tuple(gradient.shape[:batch_axes])
    outputs = math.prod(kernel.shape[:output_axes])
    weight = kernel.reshape(outputs, -1)
    rows = linear_outside_autograd(gradient.reshape(math.prod(batch_shape), outputs), weight.t())
    return rows.reshape(*batch_shape, *kernel.shape[output_axes:])


def _matrix_call(equation, inputs, kernel, product):
    batch_axes, output_axes = quantized_products.matrix_form(equation)
    batch_shape = tuple(inputs.shape[:batch_axes])
    output_shape = tuple(kernel.shape[:output_axes])
    rows = inputs.reshape(math.prod(batch_shape), -1)
    weight = kernel.reshape(math.prod(output_shape), -1)
    return product(rows, weight).reshape(*batch_shape, *output_shape)


def supports(equation):
    """Whether `einsum` takes `equation` (inputs [batch..., in...], kernel [out..., in...])."""
    return quantized_products.matrix_form(equation) is not None


@functools.lru_cache(maxsize=None)
def _function():
    import torch

    class OneDNNLinear(torch.autograd.Function):
        @staticmethod
        def forward(ctx, inputs, weight):
            # A frozen weight (LoRA's base, int8's dequantized copy) needs no inputs for
            # backward: keeping them would hold every product's activations until then.
            ctx.save_for_backward(inputs if ctx.needs_input_grad[1] else None, weight)
            return linear_outside_autograd(inputs, weight)

        @staticmethod
        def backward(ctx, gradient):
            inputs, weight = ctx.saved_tensors
            inputs_gradient = weight_gradient = None
            if ctx.needs_input_grad[0]:
                inputs_gradient = linear_outside_autograd(gradient, weight.t())
            if ctx.needs_input_grad[1]:
                weight_gradient = linear_outside_autograd(gradient.t(), inputs.t())
            return inputs_gradient, weight_gradient

    return OneDNNLinear
