"""GemmaReversibleEmbedding: Keras' ReversibleEmbedding with a true gradient through int8 logits.

After `quantize("int8")`, Keras' reverse (logits) call quantizes the hidden states to int8
on the fly and multiplies int8 by int8. Rounding has no gradient, so the gradient reaching
the hidden states is only what flows through the per-row input scale: wrong (measured on a
16-wide tiny embedding, JAX: error 0.69 against a true gradient of size 0.28). Every weight
under it, LoRA factors included, is then trained on that wrong signal (KerasHub shares it).
Here the forward stays Keras' own; the gradient with respect to the hidden states is the
product with the dequantized embedding, as Keras' int8 EinsumDense does for its inputs.
(With keras_gemma's weight-only int8 default the hidden states are not rounded at all;
an explicit activation quantizer still gets the true gradient.)

Quantized inference (issue 17): `quantize("int8")` is weight-only and Keras' default int4
config leaves this table in int8 (quantization_defaults.py); on torch the logits run
through PyTorch's packed int8/int4 CPU kernels, reading the [vocabulary, hidden] table as
stored (quantized_products.py; 63% of the 270M's bytes); the int4 lookup dequantizes only
the rows it takes (Keras' unpacks the whole table on every call).
"""

import functools

import keras
from keras import ops
from keras import quantizers

from keras_gemma.layers import decode_matmul
from keras_gemma.layers import quantization_defaults
from keras_gemma.layers import quantized_products
from keras_gemma.layers import sixteen_bit_product
from keras_gemma.layers import torch_int8_training
from keras_gemma.layers import torch_onednn_product
from keras_gemma.layers import torch_sixteen_bit_training
from keras_gemma.layers import xla_kernel_gradient


@keras.saving.register_keras_serializable(package="keras_gemma")
class GemmaReversibleEmbedding(keras.layers.ReversibleEmbedding):
    """`keras.layers.ReversibleEmbedding` whose int8 tied logits have a true input gradient.

    Same constructor, variables and saving as Keras' layer; the int8 reverse call's
    gradient differs (the soft-cap, when set, is included in it); `quantize` uses
    keras_gemma's defaults (weight-only int8; an int8 table under Keras' default int4);
    quantized inference on torch uses PyTorch's packed kernels; and training a bfloat16
    model under JAX on a CPU computes the logits a block of the vocabulary at a time
    (`sixteen_bit_product.sixteen_bit_logits`).

    Example:
    >>> embedding = GemmaReversibleEmbedding(100, 16, tie_weights=True)
    >>> embedding.build((None,))
    >>> embedding.quantize("int8")
    >>> embedding(keras.ops.ones((1, 3, 16)), reverse=True).shape
    (1, 3, 100)
    """

    def build(self, input_shape=None):
        super().build(input_shape)
        if self.quantization_mode is None:
            # The tied logits multiply by the [vocabulary, hidden] table: torch's decode
            # product wants it column-major in memory (decode_matmul.lay_out_for_decode).
            decode_matmul.lay_out_for_decode(self._embeddings, 1, self.compute_dtype)

    def call(self, inputs, reverse=False, training=None):
        product = None
        if reverse and self.tie_weights and self.reverse_dtype is None:
            product = self._tied_logits_product(inputs, training)
        if product is None:  # Keras' call
            return super().call(inputs, reverse=reverse)
        return self._soft_capped(
            product(ops.convert_to_tensor(inputs), ops.convert_to_tensor(self.embeddings))
        )

    def _tied_logits_product(self, inputs, training):
        """`product(hidden, table)` for the tied logits where a measured form beats Keras'
        matmul here, else None."""
        table = self.embeddings
        if training and sixteen_bit_product.runs_here(table):
            # A 16-bit table under XLA on a CPU, never whole in float32 (sixteen_bit_product.py).
            return sixteen_bit_product.sixteen_bit_logits
        if torch_sixteen_bit_training.runs_here(table, training):
            # Float32 arithmetic a block of the table at a time (torch_sixteen_bit_training.py).
            return torch_sixteen_bit_training.float32_logits
        if torch_onednn_product.runs_here(inputs, table, training):
            # MKL's float32 product runs AVX2 code on AMD CPUs (torch_onednn_product.py).
            return functools.partial(torch_onednn_product.einsum, "btd,vd->btv")
        if xla_kernel_gradient.runs_here(table, training):
            # The table's gradient in the order XLA's CPU dot reads (xla_kernel_gradient.py).
            return lambda hidden, table: xla_kernel_gradient.tied_logits(
                ops.cast(hidden, table.dtype), table
            )
        return None

    def quantized_call(self, inputs, reverse=False, training=None):
        # `training` exists for `call` above; Keras' quantized calls do not take it. Training
        # keeps Keras' int8 logits (their custom gradient re-reads the int8 table), except
        # under XLA on a CPU, which would hold the whole table in float32 for the step.
        if (
            reverse
            and training
            and self.tie_weights
            and self.quantization_mode == "int8"
            and self.inputs_quantizer is None
            and sixteen_bit_product.runs_here_int8()
        ):
            return self._soft_capped(sixteen_bit_product.int8_logits(
                ops.convert_to_tensor(inputs), ops.convert_to_tensor(self._embeddings),
                ops.convert_to_tensor(self.embeddings_scale),
            ))
        if (
            reverse
            and not training
            and self.tie_weights
            and self.quantization_mode == "int8"
            and self.inputs_quantizer is None
            and keras.backend.backend() in ("jax", "tensorflow")
            and decode_matmul.xla_runs_on_cpu()
        ):
            return self._xla_int8_logits(inputs)
        return super().quantized_call(inputs, reverse=reverse)

    def quantize(self, mode=None, type_check=True, config=None):
        # Keras refuses subclasses by default; this one keeps ReversibleEmbedding's calls.
        # Keras' default int8 config means weight-only here, and its default int4 config an
        # int8 embedding (quantization_defaults.py).
        config = quantization_defaults.resolved_for_embedding(config)
        mode = config.mode if config is not None else mode
        return super().quantize(mode, type_check=False, config=config)

    def _int8_build(self, embeddings_shape, config=None):
        # A quantized layer rebuilt from a saved model gets no config: weight-only as well.
        super()._int8_build(embeddings_shape, quantization_defaults.resolved(config))

    def _torch_kernels_apply(self, inputs, training=None):
        return (
            self.tie_weights
            and quantized_products.kernel_dtype(self) is not None
            and quantized_products.torch_kernels_apply(
                inputs, training, weight_only=self.inputs_quantizer is None
            )
        )

    def _xla_int8_logits(self, inputs):
        """Weight-only int8 logits through `decode_matmul.int8_decode_matmul` (inference on
        JAX/TF on a CPU: Keras' product with an int8 operand runs ~0.4 GB/s there)."""
        rows = ops.reshape(ops.cast(inputs, self.compute_dtype), (-1, self.output_dim))
        inverse = ops.reciprocal(ops.convert_to_tensor(self.embeddings_scale))
        logits = decode_matmul.int8_decode_matmul(
            rows, ops.convert_to_tensor(self._embeddings), ops.stop_gradient(inverse)
        )
        shape = tuple(ops.shape(inputs)[:-1]) + (self.input_dim,)
        return self._soft_capped(ops.reshape(logits, shape))

    def _soft_capped(self, logits):
        if self.logit_soft_cap is None:
            return logits
        cap = self.logit_soft_cap
        return ops.multiply(ops.tanh(ops.divide(logits, cap)), cap)

    def _int8_call(self, inputs, reverse=False):
        if not reverse or not self.tie_weights:
            return super()._int8_call(inputs, reverse=reverse)
        if self._torch_kernels_apply(inputs) and quantized_products.int8_supported(self.output_dim):
            # The [vocabulary, hidden] int8 table is the kernel's w [N, K] as stored.
            weights = quantized_products.int8_weights(
                self, "embeddings", ops.convert_to_tensor(self._embeddings),
                ops.convert_to_tensor(self.embeddings_scale), quantized_products.kernel_dtype(self),
            )
            logits = quantized_products.on_rows(
                ops.cast(inputs, self.compute_dtype), len(inputs.shape) - 1, (self.input_dim,),
                lambda rows: quantized_products.int8_matmul(rows, weights),
            )
            return self._soft_capped(logits)
        if keras.backend.backend() == "torch" and self.inputs_quantizer is None:
            # Dequantized a block of rows at a time, forward and backward, keeping only the
            # int8 table for backward (torch_int8_training.py).
            return torch_int8_training.int8_logits(
                inputs, ops.convert_to_tensor(self._embeddings),
                ops.convert_to_tensor(self.embeddings_scale), self.logit_soft_cap,
            )
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

    def _int4_call(self, inputs, reverse=False):
        if not reverse:
            return self._int4_lookup(inputs)
        block_size = self._int4_block_size
        if self._torch_kernels_apply(inputs) and quantized_products.int4_supported(
            self.input_dim, self.output_dim, block_size
        ):
            grouped = block_size not in (None, -1)
            weights = quantized_products.int4_weights(
                self,
                "embeddings",
                ops.convert_to_tensor(self._embeddings),  # [vocabulary, hidden / 2]
                lambda packed: quantizers.unpack_int4(packed, self.output_dim, axis=-1),
                ops.convert_to_tensor(self.embeddings_scale),
                ops.convert_to_tensor(self.embeddings_zero) if grouped else None,
                quantized_products.kernel_dtype(self),
                groups_first=False,
            )
            logits = quantized_products.on_rows(
                ops.cast(inputs, self.compute_dtype), len(inputs.shape) - 1, (self.input_dim,),
                lambda rows: quantized_products.int4_matmul(rows, weights),
            )
            return self._soft_capped(logits)
        return super()._int4_call(inputs, reverse=True)

    def _int4_lookup(self, ids):
        """The rows of `ids`, dequantized: Keras' int4 lookup unpacks the whole table first
        (262,144 x 640 values for the 270M on every decode step); this takes the packed rows
        and unpacks those only. Same variables and formulas as Keras'."""
        if keras.backend.standardize_dtype(ids.dtype) not in ("int32", "int64"):
            ids = ops.cast(ids, "int32")
        values = ops.cast(
            quantizers.unpack_int4(ops.take(self._embeddings, ids, axis=0), self.output_dim,
                                   axis=-1),
            self.compute_dtype,
        )
        scale = ops.cast(ops.take(self.embeddings_scale, ids, axis=0), self.compute_dtype)
        block_size = self._int4_block_size
        if block_size in (None, -1):
            outputs = ops.divide(values, ops.expand_dims(scale, -1))
        else:
            zero = ops.cast(ops.take(self.embeddings_zero, ids, axis=0), self.compute_dtype)
            groups = scale.shape[-1]
            padded = groups * block_size
            values = ops.reshape(values, (-1, self.output_dim))
            if padded != self.output_dim:
                values = ops.pad(values, ((0, 0), (0, padded - self.output_dim)))
            grouped = ops.reshape(values, (-1, groups, block_size))
            zero = ops.reshape(zero, (-1, groups, 1))
            scale = ops.reshape(scale, (-1, groups, 1))
            outputs = ops.reshape((grouped - zero) * scale, (-1, padded))[:, : self.output_dim]
            outputs = ops.reshape(outputs, tuple(ops.shape(ids)) + (self.output_dim,))
        if self.lora_enabled:
            low = ops.take(self.lora_embeddings_a, ids, axis=0)
            delta = ops.matmul(low, self.lora_embeddings_b)
            outputs = ops.cast(outputs + (self.lora_alpha / self.lora_rank) * delta,
                               self.compute_dtype)
        return outputs
