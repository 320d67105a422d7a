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
inputs with `b` over the kernel's last axis (down to `rank`), then with `a`. The float path,
saving, and Keras' own merge (`_get_kernel_with_merged_lora`) are untouched.
"""

import keras
from keras import ops

from keras_gemma.layers import sixteen_bit_product

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
    int8 + LoRA ("QLoRA") keeps only int8 kernels and rank-sized factors. A bfloat16 or
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

    def call(self, inputs, training=None):
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
        return super().call(inputs, training=training)

    def quantize(self, mode=None, type_check=True, config=None):
        # Keras refuses subclasses by default (their call may differ from EinsumDense's);
        # this one runs EinsumDense's call and changes only the quantized LoRA term.
        return super().quantize(mode, type_check=False, config=config)

    def _int8_call(self, inputs, training=None):
        return self._with_lora(super()._int8_call, inputs, training)

    def _int4_call(self, inputs, training=None):
        return self._with_lora(super()._int4_call, inputs, training)

    def _float8_call(self, inputs, training=None):
        return self._with_lora(super()._float8_call, inputs, training)

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
