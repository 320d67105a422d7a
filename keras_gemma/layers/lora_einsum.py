"""GemmaEinsumDense: Keras' EinsumDense, with a LoRA path for quantized kernels stored (out, in).

Every dense kernel in keras_gemma is stored (out, in) (see decode_matmul.py), so the
kernel's last axis is an input axis: query "btd,nhd->btnh" contracts `d`, the output
projection "btnh,dnh->btd" contracts `n` and `h`. Keras' `enable_lora` makes
`lora_kernel_a` with the kernel's leading axes plus `rank` and `lora_kernel_b` of shape
(rank, last axis), so `a @ b` has the kernel's shape and the float path (which merges
`kernel + a @ b` in the `kernel` property) works for any layout. Keras' int8/int4/float8
calls instead run `einsum(equation, inputs, a) @ b`, which assumes the last kernel axis is
an output axis (KerasHub's (in, out) layout) and fails on ours. This class keeps Keras'
quantized product and adds the LoRA term in the order our layout needs: contract the
inputs with `b` over the kernel's last axis (down to `rank`), then with `a`. Float kernels
train in that order too (the frozen kernel's product plus the low-rank term: Keras' merged
kernel would cost a full-size weight gradient a step); inference, saving, and Keras' own
merge (`_get_kernel_with_merged_lora`) are untouched.

Quantization, beyond LoRA (issue 17):
- `quantize("int8")` is weight-only here (quantization_defaults.py: Keras' default also
  rounds the activations per token, which costs perplexity and speed).
- int4 fills Keras' int4 variables in the layout of int4_kernel.py: Keras' own int4
  flattening is a plain reshape, right for (in, out) kernels and wrong for ours.
- On torch, inference runs the int8/int4 products through PyTorch's packed CPU kernels
  (quantized_products.py); training and the other backends keep a differentiable call.
"""

import math

import keras
from keras import ops

from keras_gemma.layers import decode_matmul
from keras_gemma.layers import int4_decode_kernels
from keras_gemma.layers import int4_kernel
from keras_gemma.layers import quantization_defaults
from keras_gemma.layers import quantized_products
from keras_gemma.layers import sixteen_bit_product
from keras_gemma.layers import torch_int8_training
from keras_gemma.layers import torch_onednn_product
from keras_gemma.layers import torch_sixteen_bit_training
from keras_gemma.layers import xla_kernel_gradient

_RANK_LETTERS = "rstuvwxyzRSTUVWXYZ"


def lora_equations(equation):
    """The two einsums `(inputs, b) -> low`, `(low, a) -> output` of a LoRA term, or None
    when the kernel's last axis is an output axis (Keras' own order then applies).

    Example:
    >>> lora_equations("btnh,dnh->btd")
    ('btnh,rh->btnr', 'btnr,dnr->btd')
    """
    inputs, rest = equation.replace(" ", "").split(",")
    kernel, output = rest.split("->")
    if "." in equation:
        raise NotImplementedError(f"LoRA on a quantized EinsumDense: no ellipsis ({equation}).")
    last = kernel[-1]
    if last in output or last not in inputs:
        return None
    rank = next(letter for letter in _RANK_LETTERS if letter not in equation)
    low = inputs.replace(last, rank)
    return f"{inputs},{rank}{last}->{low}", f"{low},{kernel.replace(last, rank)}->{output}"


@keras.saving.register_keras_serializable(package="keras_gemma")
class GemmaEinsumDense(keras.layers.EinsumDense):
    """`keras.layers.EinsumDense` whose quantized call also supports LoRA on (out, in) kernels.

    Same constructor, variables and saving as Keras' layer. Only a quantized call with LoRA
    enabled differs: Keras' quantized product without LoRA, plus
    `alpha / rank * einsum(einsum(inputs, b), a)`; the full-size `a @ b` is never formed, so
    int8 + LoRA ("QLoRA") keeps only int8 kernels and rank-sized factors. `quantize("int8")`
    is weight-only (per-channel int8 kernels, float activations); int4 keeps Keras'
    variables in the (out, in)-aware layout of int4_kernel.py; on torch, inference
    multiplies through PyTorch's packed int8/int4 CPU kernels. A bfloat16 or
    float16 kernel under JAX on a CPU multiplies through `sixteen_bit_product`, which keeps
    XLA from holding a float32 copy of every weight at once.

    Example:
    >>> layer = GemmaEinsumDense("btd,fd->btf", output_shape=(None, 8))
    >>> layer.build((None, None, 4))
    >>> layer.quantize("int8")
    >>> layer.enable_lora(2)
    >>> layer(keras.ops.ones((1, 3, 4))).shape
    (1, 3, 8)
    """

    # A callable given each call's inputs (GPTQ calibration, gptq_quantization.py).
    _input_observer = None

    def build(self, input_shape):
        super().build(input_shape)
        form = quantized_products.matrix_form(self.equation)
        if self.quantization_mode is None and form is not None:
            # Kernels [outputs..., inputs...]: torch's decode product wants some of them
            # column-major in memory (decode_matmul.lay_out_for_decode).
            input_axes = len(self._kernel.shape) - form[1]
            decode_matmul.lay_out_for_decode(self._kernel, input_axes, self.compute_dtype)

    def call(self, inputs, training=None):
        if self._input_observer is not None:
            self._input_observer(inputs)
        if (
            training
            and self.lora_enabled
            and self.quantization_mode is None
            and "." not in self.equation
            and lora_equations(self.equation) is not None
            and self.bias is None
            and self.activation in (None, keras.activations.linear)
        ):
            # LoRA in training: the frozen kernel's product plus the low-rank term, never
            # the merged `kernel + a @ b` of Keras' property, whose gradient is a full-size
            # weight gradient (2 FLOPs a weight and token) computed only to be reduced to
            # the factors' (peft's order, too).
            return self._with_lora(self._float_call, inputs, training)
        return self._float_call(inputs, training)

    def _float_call(self, inputs, training=None):
        # Training a 16-bit model under XLA on a CPU: a product that does not hold a float32
        # copy of every weight at once (see sixteen_bit_product.py). Inference keeps Keras'
        # call: generation's own paths already bound its memory, and its tokens must not
        # depend on which program a product was compiled into.
        kernel = self.kernel
        plain = self.bias is None and self.activation in (None, keras.activations.linear)
        if training and plain and sixteen_bit_product.runs_here(kernel):
            return sixteen_bit_product.sixteen_bit_einsum(
                self.equation, ops.convert_to_tensor(inputs), ops.convert_to_tensor(kernel)
            )
        if plain and torch_sixteen_bit_training.runs_here(kernel, training):
            # torch's bfloat16 products on a CPU without AVX-512 BF16 run at 0.1-6.6
            # GFLOP/s (torch_sixteen_bit_training.py): float32 arithmetic, 16-bit storage.
            return torch_sixteen_bit_training.float32_einsum(
                self.equation, ops.convert_to_tensor(inputs), ops.convert_to_tensor(kernel)
            )
        if (
            plain
            and torch_onednn_product.runs_here(inputs, kernel, training)
            and torch_onednn_product.supports(self.equation)
        ):
            # MKL's float32 product runs AVX2 code on AMD CPUs (torch_onednn_product.py).
            return torch_onednn_product.einsum(
                self.equation, ops.convert_to_tensor(inputs), ops.convert_to_tensor(kernel)
            )
        if (
            plain
            and xla_kernel_gradient.runs_here(kernel, training)
            and torch_onednn_product.supports(self.equation)
        ):
            return xla_kernel_gradient.einsum(self.equation, inputs, kernel)
        return super().call(inputs, training=training)

    def quantize(self, mode=None, type_check=True, config=None):
        # Keras refuses subclasses by default (their call may differ from EinsumDense's);
        # this one runs EinsumDense's call and changes only the quantized LoRA term.
        # Keras' default int8 config means weight-only here (quantization_defaults.py).
        config = quantization_defaults.resolved(config)
        mode = config.mode if config is not None else mode
        if mode != "int4":
            return super().quantize(mode, type_check=False, config=config)
        # Keras' int4 variables, filled in the layout of int4_kernel.py (Keras' own fill
        # mixes inputs with outputs for kernels stored (out, in)).
        kernel = ops.convert_to_numpy(self._kernel)
        super().quantize(mode, type_check=False, config=config)
        packed, scale, zero = int4_kernel.quantize(self, kernel, self._int4_block_size)
        self._kernel.assign(packed)
        self.kernel_scale.assign(scale)
        if zero is not None:
            self.kernel_zero.assign(zero)

    def _int8_build(self, kernel_shape, config=None):
        # A quantized layer rebuilt from a saved model gets no config: weight-only as well.
        super()._int8_build(kernel_shape, quantization_defaults.resolved(config))

    @property
    def kernel(self):
        if self.quantization_mode != "int4":
            return super().kernel
        # Keras' property reshapes its own int4 layout; this is ours (int4_kernel.py): the
        # int4 values in the kernel's shape, plus the LoRA term as Keras adds it.
        kernel = int4_kernel.to_kernel_shape(self, int4_kernel.unpacked(self))
        if self.lora_enabled:
            delta = ops.matmul(self.lora_kernel_a, self.lora_kernel_b)
            kernel = ops.cast(kernel + (self.lora_alpha / self.lora_rank) * delta,
                              self.compute_dtype)
        return kernel

    def _int8_call(self, inputs, training=None):
        return self._with_lora(self._int8_product, inputs, training)

    def _int4_call(self, inputs, training=None):
        return self._with_lora(self._int4_product, inputs, training)

    def _float8_call(self, inputs, training=None):
        return self._with_lora(super()._float8_call, inputs, training)

    def _torch_form(self, inputs, training):
        """`(batch axes, output axes)` when this call may use PyTorch's packed kernels."""
        if self.bias is not None or self.activation not in (None, keras.activations.linear):
            return None
        if quantized_products.kernel_dtype(self) is None:
            return None
        if not quantized_products.torch_kernels_apply(
            inputs, training, weight_only=self.inputs_quantizer is None
        ):
            return None
        return quantized_products.matrix_form(self.equation)

    def _int8_product(self, inputs, training=None):
        form = self._torch_form(inputs, training)
        if form is not None and not quantized_products.int8_supported(
            math.prod(self._kernel.shape[form[1]:])
        ):
            form = None
        if form is None and self._xla_weight_only(training):
            return self._xla_int8(inputs)
        if form is None:
            plain = self.bias is None and self.activation in (None, keras.activations.linear)
            weight_only = plain and self.inputs_quantizer is None
            if weight_only and training and sixteen_bit_product.runs_here_int8():
                # Training under XLA on a CPU: one float32 kernel alive at a time, not all
                # (2B int8 + LoRA step: 21.8 -> 7.3 GB peak; see sixteen_bit_product.py).
                return sixteen_bit_product.int8_einsum(
                    self.equation, ops.convert_to_tensor(inputs),
                    ops.convert_to_tensor(self._kernel), ops.convert_to_tensor(self.kernel_scale),
                )
            if plain and self.inputs_quantizer is None and keras.backend.backend() == "torch":
                # Keras 3.15's weight-only int8 call on torch rescales `kernel_scale` in
                # place of the argument its gradient reads, which then fails; the same
                # product, with the inputs' gradient through the dequantized kernel.
                scale = self._adjust_scale_for_dequant(ops.convert_to_tensor(self.kernel_scale))
                if quantized_products.matrix_form(self.equation) is not None:
                    # Autograd would save the float kernel for backward; this saves the int8
                    # one (torch_int8_training.py).
                    return torch_int8_training.int8_einsum(
                        self.equation, inputs, ops.convert_to_tensor(self._kernel), scale,
                        self.compute_dtype,
                    )
                kernel = ops.divide(ops.cast(self._kernel, self.compute_dtype), scale)
                return ops.einsum(self.equation, inputs, ops.stop_gradient(kernel))
            return super()._int8_call(inputs, training=training)
        batch_axes, output_axes = form
        kernel = ops.convert_to_tensor(self._kernel)
        dtype = quantized_products.kernel_dtype(self)
        weights = quantized_products.int8_weights(
            self, "kernel", kernel, ops.convert_to_tensor(self.kernel_scale), dtype
        )
        return quantized_products.on_rows(
            ops.cast(inputs, self.compute_dtype), batch_axes, tuple(kernel.shape[:output_axes]),
            lambda rows: quantized_products.int8_matmul(rows, weights),
        )

    def _xla_weight_only(self, training):
        """Whether this call takes `decode_matmul.int8_decode_matmul` (JAX/TF inference on
        a CPU, weight-only, a matrix-form equation)."""
        return (
            keras.backend.backend() in ("jax", "tensorflow")
            and not training
            and self.inputs_quantizer is None
            and self.bias is None
            and self.activation in (None, keras.activations.linear)
            and quantized_products.matrix_form(self.equation) is not None
            and decode_matmul.xla_runs_on_cpu()
        )

    def _xla_int8(self, inputs):
        batch_axes, output_axes = quantized_products.matrix_form(self.equation)
        kernel = ops.convert_to_tensor(self._kernel)
        output_shape = tuple(kernel.shape[:output_axes])
        n = math.prod(output_shape)
        rows = ops.reshape(ops.cast(inputs, self.compute_dtype), (-1, math.prod(kernel.shape) // n))
        inverse = ops.reciprocal(ops.reshape(ops.convert_to_tensor(self.kernel_scale), (n,)))
        product = decode_matmul.int8_decode_matmul(
            rows, ops.reshape(kernel, (n, -1)), ops.stop_gradient(inverse)
        )
        return ops.reshape(product, tuple(ops.shape(inputs)[:batch_axes]) + output_shape)

    def _int4_product(self, inputs, training=None):
        if self.inputs_quantizer is not None:
            raise NotImplementedError(f"{self.name}: int4 with an activation quantizer.")
        shape = tuple(self.original_kernel_shape)
        form = self._torch_form(inputs, training)
        block_size = self._int4_block_size
        if form is not None:
            batch_axes, output_axes = form
            n, k = math.prod(shape[:output_axes]), math.prod(shape[output_axes:])
            if quantized_products.int4_supported(n, k, block_size):
                return self._torch_int4(inputs, batch_axes, shape[:output_axes])
        provided = None if training else int4_decode_kernels.kernel_for(self)
        matrix = quantized_products.matrix_form(self.equation)
        if provided is not None:
            # Under XLA on a CPU, the kernel was dequantized once for the whole generate()
            # call (int4_decode_kernels.py): one row reads it in bfloat16, rounded alike;
            # several (a prefill) in float32, where XLA's bfloat16 products are slow.
            batch_axes, output_axes = matrix
            rows = ops.reshape(inputs, (-1, provided.shape[1]))
            kernel = provided if rows.shape[0] == 1 else ops.cast(provided, "float32")
            product = decode_matmul.decode_matmul(ops.cast(rows, kernel.dtype), kernel)
            product = ops.cast(product, inputs.dtype)
            outputs = ops.reshape(
                product, tuple(ops.shape(inputs)[:batch_axes]) + shape[:output_axes]
            )
        elif matrix is not None:  # inputs [rows, K] @ flat [K, N]: no transpose of the kernel
            # Dequantized in the layout of int4_kernel.py; the int variables have no
            # gradient, the inputs (and LoRA, added by _with_lora) keep theirs.
            flat = ops.stop_gradient(int4_kernel.dequantized_flat(self, self.compute_dtype))
            batch_axes, output_axes = matrix
            rows = ops.reshape(inputs, (-1, flat.shape[0]))
            outputs = ops.reshape(
                ops.matmul(rows, flat), tuple(ops.shape(inputs)[:batch_axes]) + shape[:output_axes]
            )
        else:
            flat = ops.stop_gradient(int4_kernel.dequantized_flat(self, self.compute_dtype))
            outputs = ops.einsum(self.equation, inputs, int4_kernel.to_kernel_shape(self, flat))
        if self.lora_enabled:  # reached only where Keras' LoRA order applies (_with_lora)
            low = ops.einsum(self.equation, inputs, self.lora_kernel_a)
            delta = ops.matmul(low, self.lora_kernel_b)
            outputs = ops.add(outputs, (self.lora_alpha / self.lora_rank) * delta)
        if self.bias is not None:
            outputs = ops.add(outputs, self.bias)
        if self.activation is not None:
            outputs = self.activation(outputs)
        return outputs

    def _torch_int4(self, inputs, batch_axes, output_shape):
        grouped = self._int4_block_size not in (None, -1)
        weights = quantized_products.int4_weights(
            self,
            "kernel",
            ops.convert_to_tensor(self._kernel),
            lambda packed: int4_kernel.unpacked(self, packed).T,  # [in, out] -> [N, K]
            ops.convert_to_tensor(self.kernel_scale),
            ops.convert_to_tensor(self.kernel_zero) if grouped else None,
            quantized_products.kernel_dtype(self),
            groups_first=True,
        )
        return quantized_products.on_rows(
            ops.cast(inputs, self.compute_dtype), batch_axes, tuple(output_shape),
            lambda rows: quantized_products.int4_matmul(rows, weights),
        )

    def _get_kernel_with_merged_lora(self):
        if self.quantization_mode != "int4" or not self.lora_enabled:
            return super()._get_kernel_with_merged_lora()
        # Keras' merge re-packs in its own int4 layout; merge and re-pack in ours.
        kernel = int4_kernel.to_kernel_shape(self, int4_kernel.dequantized_flat(self, "float32"))
        delta = ops.matmul(self.lora_kernel_a, self.lora_kernel_b)
        merged = ops.convert_to_numpy(kernel + (self.lora_alpha / self.lora_rank) * delta)
        return int4_kernel.quantize(self, merged, self._int4_block_size)

    def _with_lora(self, quantized_call, inputs, training):
        equations = lora_equations(self.equation) if self.lora_enabled else None
        if equations is None:
            return quantized_call(inputs, training=training)
        if self.bias is not None or self.activation not in (None, keras.activations.linear):
            # Keras adds LoRA before the bias and activation; our layers have neither.
            raise NotImplementedError(
                f"{self.name}: LoRA on a quantized kernel stored (out, in) supports layers "
                "without bias and activation only."
            )
        # Keras' call without its LoRA term (which would fail on this layout), then ours.
        self.lora_enabled = False
        try:
            outputs = quantized_call(inputs, training=training)
        finally:
            self.lora_enabled = True
        to_low, from_low = equations
        dtype = outputs.dtype
        low = ops.einsum(to_low, ops.cast(inputs, dtype), ops.cast(self.lora_kernel_b, dtype))
        delta = ops.einsum(from_low, low, ops.cast(self.lora_kernel_a, dtype))
        return ops.add(outputs, ops.cast(self.lora_alpha / self.lora_rank, dtype) * delta)
