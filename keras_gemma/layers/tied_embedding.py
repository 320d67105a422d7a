"""GemmaReversibleEmbedding: Keras' ReversibleEmbedding with a true gradient through int8 logits.

After `quantize("int8")`, Keras' reverse (logits) call quantizes the hidden states to int8
on the fly and multiplies int8 by int8. Rounding has no gradient, so the gradient reaching
the hidden states is only what flows through the per-row input scale: wrong (measured on a
16-wide tiny embedding, JAX: error 0.69 against a true gradient of size 0.28). Every weight
under it, LoRA factors included, is then trained on that wrong signal (KerasHub shares it).
Here the forward stays Keras' own; the gradient with respect to the hidden states is the
product with the dequantized embedding, as Keras' int8 EinsumDense does for its inputs.
"""

import keras
from keras import ops

from keras_gemma.layers import sixteen_bit_product


@keras.saving.register_keras_serializable(package="keras_gemma")
class GemmaReversibleEmbedding(keras.layers.ReversibleEmbedding):
    """`keras.layers.ReversibleEmbedding` whose int8 tied logits have a true input gradient.

    Same constructor, variables and saving as Keras' layer; only the int8 reverse call's
    gradient differs (the soft-cap, when set, is included in it), and training a bfloat16
    model under JAX on a CPU computes the logits a block of the vocabulary at a time
    (`sixteen_bit_product.sixteen_bit_logits`).

    Example:
    >>> embedding = GemmaReversibleEmbedding(100, 16, tie_weights=True)
    >>> embedding.build((None,))
    >>> embedding.quantize("int8")
    >>> embedding(keras.ops.ones((1, 3, 16)), reverse=True).shape
    (1, 3, 100)
    """

    def call(self, inputs, reverse=False, training=None):
        # Training a 16-bit model under XLA on a CPU: tied logits that never hold the whole
        # embedding in float32 (see sixteen_bit_product.py). Keras' call everywhere else.
        if (
            training
            and reverse
            and self.tie_weights
            and self.reverse_dtype is None
            and sixteen_bit_product.runs_here(self.embeddings)
        ):
            logits = sixteen_bit_product.sixteen_bit_logits(
                ops.convert_to_tensor(inputs), ops.convert_to_tensor(self.embeddings)
            )
            if self.logit_soft_cap is not None:
                cap = self.logit_soft_cap
                logits = ops.multiply(ops.tanh(ops.divide(logits, cap)), cap)
            return logits
        return super().call(inputs, reverse=reverse)

    def quantized_call(self, *args, training=None, **kwargs):
        # `training` exists for `call` above; Keras' quantized calls do not take it.
        return super().quantized_call(*args, **kwargs)

    def quantize(self, mode=None, type_check=True, config=None):
        # Keras refuses subclasses by default; this one keeps ReversibleEmbedding's calls.
        return super().quantize(mode, type_check=False, config=config)

    def _int8_call(self, inputs, reverse=False):
        if not reverse or not self.tie_weights:
            return super()._int8_call(inputs, reverse=reverse)
        forward = super()._int8_call
        cap = self.logit_soft_cap

        @ops.custom_gradient
        def logits_with_inputs_gradient(inputs, embeddings, scale):
            logits = forward(inputs, reverse=True)

            def grad_fn(*args, upstream=None):
                if upstream is None:
                    (upstream,) = args
                if cap is not None:  # d(cap * tanh(z / cap)) / dz = 1 - (logits / cap)^2
                    upstream = upstream * (1.0 - ops.square(logits / cap))
                # logits = inputs @ (embeddings / scale[:, None]).T
                scaled = ops.divide(upstream, ops.cast(scale, upstream.dtype))
                return ops.matmul(scaled, ops.cast(embeddings, upstream.dtype)), None, None

            return logits, grad_fn

        return logits_with_inputs_gradient(
            inputs,
            ops.convert_to_tensor(self._embeddings),
            ops.convert_to_tensor(self.embeddings_scale),
        )
