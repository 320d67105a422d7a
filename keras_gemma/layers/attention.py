"""Grouped-query attention with Gemma's switches and a preallocated KV cache."""

import keras
from keras import ops

from keras_gemma.layers.decode_matmul import decode_matmul
from keras_gemma.layers.decode_matmul import is_decode_step
from keras_gemma.layers.initialization import initializer
from keras_gemma.layers.lora_einsum import GemmaEinsumDense
from keras_gemma.layers.normalization import RMSNormalization
from keras_gemma.layers.rotary import rotary_embedding

# Masked logits get this value rather than -inf, so a row with every key masked gives a
# uniform (finite) distribution instead of NaN.
_MASKED_LOGIT = -1e30


def compute_attention_mask(
    query_length, key_length, start_index=0, padding_mask=None, sliding_window_size=None
):
    """Boolean [batch or 1, query, key] mask: causal, optionally windowed and padded.

    Query `i` sits at absolute position `start_index + i`; key `j` at position `j`. A key is
    visible when it is not in the future, within `sliding_window_size` positions of the
    query when a window is given (query - key < window), and marked 1 in `padding_mask`.

    Example:
    >>> compute_attention_mask(3, 3).shape
    (1, 3, 3)
    """
    query_positions = ops.expand_dims(
        ops.arange(query_length, dtype="int32") + ops.cast(start_index, "int32"), 1
    )
    key_positions = ops.expand_dims(ops.arange(key_length, dtype="int32"), 0)
    mask = ops.less_equal(key_positions, query_positions)
    if sliding_window_size is not None:
        mask = ops.logical_and(
            mask, ops.less(query_positions - key_positions, sliding_window_size)
        )
    mask = ops.expand_dims(mask, 0)
    if padding_mask is not None:
        keys_present = ops.expand_dims(ops.cast(padding_mask, "bool"), 1)
        mask = ops.logical_and(mask, keys_present)
    return mask


def segment_mask_and_positions(padding_mask):
    """Attention visibility [batch, query, key] and rotary positions [batch, seq] of a
    `padding_mask` that may hold segment ids (packed training rows, keras_gemma/packing.py).

    0 is padding and k > 0 the k-th example of the row. A query of example k sees the keys of
    example k only (the caller adds causality and the window); a padding query sees every real
    key, as it always has. A token of example k >= 2 sits at position "tokens of example k
    before it", so each example starts again at 0; example 1 and padding keep their index.
    For a 0/1 mask this is exactly the ordinary padding mask and positions 0, 1, 2, ...

    Example:
    >>> visible, positions = segment_mask_and_positions(ops.array([[1, 1, 2, 2, 2, 0]]))
    >>> positions    # [[0, 1, 0, 1, 2, 5]]
    """
    segments = ops.cast(padding_mask, "int32")
    length = ops.shape(segments)[1]
    # same[b, q, k]: query q and key k are in the same segment.
    same = ops.equal(ops.expand_dims(segments, 2), ops.expand_dims(segments, 1))
    query_is_padding = ops.expand_dims(ops.equal(segments, 0), 2)
    key_is_real = ops.expand_dims(ops.not_equal(segments, 0), 1)
    visible = ops.logical_and(ops.logical_or(same, query_is_padding), key_is_real)
    index = ops.arange(length, dtype="int32")
    # earlier[q, k]: key k comes before query q.
    earlier = ops.less(ops.expand_dims(index, 0), ops.expand_dims(index, 1))
    before_in_segment = ops.sum(ops.cast(ops.logical_and(same, earlier), "int32"), axis=2)
    positions = ops.where(ops.greater(segments, 1), before_in_segment, ops.expand_dims(index, 0))
    return visible, positions


def _project_to_heads(dense, inputs):
    """`dense(inputs)` for a "btd,nhd->btnh" EinsumDense; a decode step reshapes the
    (heads, head_dim, hidden) kernel to (heads * head_dim, hidden) and runs `decode_matmul`
    (LoRA included: `dense.kernel` merges it)."""
    if not is_decode_step(dense, inputs):
        return dense(inputs)
    kernel = ops.cast(dense.kernel, dense.compute_dtype)
    batch, _, hidden = inputs.shape
    heads, head_dim, _ = kernel.shape
    projected = decode_matmul(
        ops.reshape(inputs, (batch, hidden)), ops.reshape(kernel, (heads * head_dim, hidden))
    )
    return ops.reshape(projected, (batch, 1, heads, head_dim))


def _project_from_heads(dense, inputs):
    """`dense(inputs)` for the "btnh,dnh->btd" output EinsumDense; a decode step reshapes
    the (hidden, heads, head_dim) kernel to (hidden, heads * head_dim)."""
    if not is_decode_step(dense, inputs):
        return dense(inputs)
    kernel = ops.cast(dense.kernel, dense.compute_dtype)
    batch, _, heads, head_dim = inputs.shape
    hidden = kernel.shape[0]
    projected = decode_matmul(
        ops.reshape(inputs, (batch, heads * head_dim)),
        ops.reshape(kernel, (hidden, heads * head_dim)),
    )
    return ops.reshape(projected, (batch, 1, hidden))


@keras.saving.register_keras_serializable(package="keras_gemma")
class GemmaAttention(keras.layers.Layer):
    """Multi-head attention with grouped key/value heads, as in every Gemma generation.

    Queries, keys and values are projected per head; keys and values may have fewer heads
    than queries (grouped-query attention; one head is multi-query). Optional: RMS
    normalization of queries and keys (Gemma 3), a tanh soft-cap on the attention logits
    (Gemma 2), and a sliding window (applied by the caller's mask). The softmax runs in
    float32. Kernels are stored (out, in): query (heads, head_dim, hidden), key and value
    (kv_heads, head_dim, hidden), output (hidden, heads, head_dim).

    Args:
        num_query_heads: number of query heads.
        num_key_value_heads: number of key/value heads; divides num_query_heads.
        head_dim: width of each head.
        query_pre_attn_scalar: queries are multiplied by `query_pre_attn_scalar ** -0.5`.
        attention_logit_soft_cap: if set, logits become `cap * tanh(logits / cap)`.
        use_query_key_norm: RMS-normalize queries and keys over head_dim before RoPE.
        rope_max_wavelength: the RoPE base for this layer.
        rope_scaling_factor: linear RoPE position scaling for this layer.
        layer_norm_epsilon: epsilon of the query/key norms.
        dropout: dropout on the attention probabilities while training.

    Example:
    >>> attention = GemmaAttention(4, 1, 8, query_pre_attn_scalar=8)
    >>> x = keras.ops.ones((2, 5, 16))
    >>> attention(x, attention_mask=compute_attention_mask(5, 5)).shape
    (2, 5, 16)
    """

    def __init__(
        self,
        num_query_heads,
        num_key_value_heads,
        head_dim,
        query_pre_attn_scalar,
        attention_logit_soft_cap=None,
        use_query_key_norm=False,
        rope_max_wavelength=10000.0,
        rope_scaling_factor=1.0,
        layer_norm_epsilon=1e-6,
        dropout=0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if num_query_heads % num_key_value_heads:
            raise ValueError(
                f"num_query_heads ({num_query_heads}) must be a multiple of "
                f"num_key_value_heads ({num_key_value_heads})."
            )
        self.num_query_heads = num_query_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.query_pre_attn_scalar = query_pre_attn_scalar
        self.attention_logit_soft_cap = attention_logit_soft_cap
        self.use_query_key_norm = use_query_key_norm
        self.rope_max_wavelength = rope_max_wavelength
        self.rope_scaling_factor = rope_scaling_factor
        self.layer_norm_epsilon = layer_norm_epsilon
        self.dropout = dropout

    def build(self, input_shape):
        hidden_dim = input_shape[-1]
        policy = self.dtype_policy
        self.query_dense = GemmaEinsumDense(
            "btd,nhd->btnh",
            output_shape=(None, self.num_query_heads, self.head_dim),
            kernel_initializer=initializer("glorot_uniform"),
            dtype=policy,
            name="query",
        )
        self.query_dense.build(input_shape)
        self.key_dense = GemmaEinsumDense(
            "btd,khd->btkh",
            output_shape=(None, self.num_key_value_heads, self.head_dim),
            kernel_initializer=initializer("glorot_uniform"),
            dtype=policy,
            name="key",
        )
        self.key_dense.build(input_shape)
        self.value_dense = GemmaEinsumDense(
            "btd,khd->btkh",
            output_shape=(None, self.num_key_value_heads, self.head_dim),
            kernel_initializer=initializer("glorot_uniform"),
            dtype=policy,
            name="value",
        )
        self.value_dense.build(input_shape)
        self.output_dense = GemmaEinsumDense(
            "btnh,dnh->btd",
            output_shape=(None, hidden_dim),
            kernel_initializer=initializer("glorot_uniform"),
            dtype=policy,
            name="attention_output",
        )
        self.output_dense.build((None, None, self.num_query_heads, self.head_dim))
        if self.use_query_key_norm:
            self.query_norm = RMSNormalization(
                epsilon=self.layer_norm_epsilon, dtype=policy, name="query_norm"
            )
            self.query_norm.build((None, None, None, self.head_dim))
            self.key_norm = RMSNormalization(
                epsilon=self.layer_norm_epsilon, dtype=policy, name="key_norm"
            )
            self.key_norm.build((None, None, None, self.head_dim))
        self.dropout_layer = keras.layers.Dropout(self.dropout, dtype=policy)
        self.built = True

    def call(
        self,
        inputs,
        attention_mask,
        cache=None,
        cache_update_index=0,
        training=False,
        positions=None,
    ):
        """Attends `inputs` [batch, seq, hidden] under `attention_mask` [batch, seq, keys].

        Without a cache the keys are the inputs themselves. With a cache
        [batch, 2, max_length, kv_heads, head_dim], this call's keys and values are written
        at `cache_update_index` and attention runs over the whole cache; the updated cache is
        returned with the output. `positions` [batch, seq] overrides the rotary positions
        (packed rows restart them per example); by default they count from
        `cache_update_index`.
        """
        if positions is None:
            query_length = ops.shape(inputs)[1]
            positions = ops.arange(query_length, dtype="int32") + ops.cast(
                cache_update_index, "int32"
            )
        query = _project_to_heads(self.query_dense, inputs)
        key = _project_to_heads(self.key_dense, inputs)
        value = _project_to_heads(self.value_dense, inputs)
        if self.use_query_key_norm:
            query = self.query_norm(query)
            key = self.key_norm(key)
        query = rotary_embedding(
            query, positions, self.rope_max_wavelength, self.rope_scaling_factor
        )
        key = rotary_embedding(
            key, positions, self.rope_max_wavelength, self.rope_scaling_factor
        )
        if cache is not None:
            start = [0, cache_update_index, 0, 0]
            key = ops.slice_update(cache[:, 0, ...], start, key)
            value = ops.slice_update(cache[:, 1, ...], start, value)
            cache = ops.stack((key, value), axis=1)
        output = self._attend(query, key, value, attention_mask, training)
        output = _project_from_heads(self.output_dense, output)
        if cache is not None:
            return output, cache
        return output

    def _attend(self, query, key, value, attention_mask, training):
        groups = self.num_query_heads // self.num_key_value_heads
        query = query * ops.cast(self.query_pre_attn_scalar**-0.5, query.dtype)
        batch, query_length = ops.shape(query)[0], ops.shape(query)[1]
        query = ops.reshape(
            query,
            (batch, query_length, self.num_key_value_heads, groups, self.head_dim),
        )
        logits = ops.einsum(
            "bqkgh,bskh->bkgqs", query, key
        )
        logits = ops.cast(logits, "float32")
        if self.attention_logit_soft_cap is not None:
            cap = self.attention_logit_soft_cap
            logits = ops.tanh(logits / cap) * cap
        mask = ops.expand_dims(ops.expand_dims(attention_mask, 1), 1)
        logits = ops.where(mask, logits, _MASKED_LOGIT)
        probabilities = ops.softmax(logits, axis=-1)
        probabilities = self.dropout_layer(
            ops.cast(probabilities, self.compute_dtype), training=training
        )
        output = ops.einsum("bkgqs,bskh->bqkgh", probabilities, value)
        return ops.reshape(
            output, (batch, query_length, self.num_query_heads, self.head_dim)
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_query_heads": self.num_query_heads,
                "num_key_value_heads": self.num_key_value_heads,
                "head_dim": self.head_dim,
                "query_pre_attn_scalar": self.query_pre_attn_scalar,
                "attention_logit_soft_cap": self.attention_logit_soft_cap,
                "use_query_key_norm": self.use_query_key_norm,
                "rope_max_wavelength": self.rope_max_wavelength,
                "rope_scaling_factor": self.rope_scaling_factor,
                "layer_norm_epsilon": self.layer_norm_epsilon,
                "dropout": self.dropout,
            }
        )
        return config
