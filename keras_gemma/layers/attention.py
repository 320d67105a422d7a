"""Grouped-query attention with Gemma's switches and a preallocated KV cache."""

import keras
from keras import ops

from keras_gemma.layers import torch_attention
from keras_gemma.layers.decode_matmul import decode_matmul
from keras_gemma.layers.decode_matmul import is_decode_step
from keras_gemma.layers.initialization import initializer
from keras_gemma.layers.kv_cache import write_to_cache
from keras_gemma.layers.lora_einsum import GemmaEinsumDense
from keras_gemma.layers.normalization import RMSNormalization
from keras_gemma.layers.rotary import apply_rotary
from keras_gemma.layers.rotary import rotary_tables
from keras_gemma.layers.shared_rows import decode_products
from keras_gemma.layers.shared_rows import share_rows

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


class CachePositions:
    """The positions of one cached call, and what every layer derives from them, made once.

    A cached call (a prefill, or one decode step) runs `query_length` tokens at positions
    `start_index, start_index + 1, ...` against a cache of `key_length` positions. Each decoder
    block needs the attention mask of its window and the rotary tables of its RoPE settings;
    Gemma 3's blocks come in two kinds, so a call needs two masks and two tables, not one of
    each per block. Made by the caller once per call (`GemmaCausalLM.hidden_with_cache`), or
    by a block called on its own; each mask and table is computed on its first request.

    Example:
    >>> positions = CachePositions(1, 64, start_index=index)
    >>> mask = positions.attention_mask(sliding_window_size=512)  # [1, 1, 1, 1, 64]
    >>> cos, sin = positions.rotary_tables(head_dim=256, max_wavelength=1e6)
    """

    def __init__(self, query_length, key_length, start_index=0, padding_mask=None):
        self.query_length = query_length
        self.key_length = key_length
        self.start_index = start_index
        self.padding_mask = padding_mask
        self.positions = ops.arange(query_length, dtype="int32") + ops.cast(start_index, "int32")
        self._masks = {}
        self._tables = {}
        self._derived = {}

    def attention_mask(self, sliding_window_size=None):
        """Boolean [batch or 1, 1, 1, query, key]: `compute_attention_mask` shaped to
        broadcast over the attention logits [batch, kv_heads, groups, query, key]."""
        mask = self._masks.get(sliding_window_size)
        if mask is None:
            mask = compute_attention_mask(
                self.query_length,
                self.key_length,
                start_index=self.start_index,
                padding_mask=self.padding_mask,
                sliding_window_size=sliding_window_size,
            )
            mask = self._masks[sliding_window_size] = ops.expand_dims(mask, (1, 2))
        return mask

    def derived(self, source, kind, make):
        """`make(source)`, made once per call for the tensor `source` (a mask of this call)
        and `kind` (a hashable naming what `make` makes): every block reuses it.

        Example:
        >>> additive = positions.derived(mask, ("additive", "float32"), to_additive)
        """
        key = (id(source), kind)
        entry = self._derived.get(key)
        if entry is None or entry[0] is not source:  # held, so the id names this tensor
            entry = self._derived[key] = (source, make(source))
        return entry[1]

    def rotary_tables(self, head_dim, max_wavelength=10000.0, scaling_factor=1.0):
        """`rotary_tables(positions, ...)` for these positions (see rotary.py)."""
        key = (head_dim, float(max_wavelength), float(scaling_factor))
        tables = self._tables.get(key)
        if tables is None:
            tables = self._tables[key] = rotary_tables(self.positions, *key)
        return tables


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


def _project_to_heads(dense, inputs, rows=None, training=None):
    """`dense(inputs)` for a "btd,nhd->btnh" EinsumDense; a decode step reshapes the
    (heads, head_dim, hidden) kernel to (heads * head_dim, hidden) and runs `decode_matmul`
    on `rows`, the inputs as [batch, hidden] (LoRA included: `dense.kernel` merges it).
    `training` is passed on explicitly: a rematerialized block's recomputation runs outside
    the call context that would otherwise supply it (block_remat.py)."""
    if rows is None or not is_decode_step(dense, inputs):
        return dense(inputs, training=training)
    kernel = ops.cast(dense.kernel, dense.compute_dtype)
    heads, head_dim, hidden = kernel.shape
    projected = decode_matmul(rows, ops.reshape(kernel, (heads * head_dim, hidden)))
    return ops.reshape(projected, (rows.shape[0], 1, heads, head_dim))


def _project_from_heads(dense, inputs, heads, head_dim, training=None):
    """`dense(...)` for the "btnh,dnh->btd" output EinsumDense on the attention output
    `inputs` [batch, seq, kv_heads, groups, head_dim]; a decode step reshapes the
    (hidden, heads, head_dim) kernel to (hidden, heads * head_dim) and the inputs to rows
    [batch, heads * head_dim] in one reshape each."""
    if not is_decode_step(dense, inputs):
        batch, query_length = ops.shape(inputs)[0], ops.shape(inputs)[1]
        return dense(ops.reshape(inputs, (batch, query_length, heads, head_dim)), training=training)
    kernel = ops.cast(dense.kernel, dense.compute_dtype)
    batch, hidden = inputs.shape[0], kernel.shape[0]
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
        # torch: one decode product for the three (shared_rows.py).
        share_rows([self.query_dense._kernel, self.key_dense._kernel, self.value_dense._kernel])
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
        cache_positions=None,
    ):
        """Attends `inputs` [batch, seq, hidden] under `attention_mask`.

        `attention_mask` is boolean [batch, seq, keys], or already shaped to broadcast over
        the logits [batch, kv_heads, groups, seq, keys] (`CachePositions.attention_mask`).
        Without a cache the keys are the inputs themselves. With a cache
        [batch, 2, max_length, kv_heads, head_dim], this call's keys and values are written
        at `cache_update_index` and attention runs over the whole cache; the updated cache is
        returned with the output. Rotary positions: those of `cache_positions` (a
        `CachePositions` shared by the blocks of one cached call, which keeps the tables of
        each RoPE setting) if given, else `positions` [batch, seq] (packed rows restart them
        per example), else counting from `cache_update_index`.
        """
        # The tables come in inside `cache_positions`, not as tensors: Layer.__call__ would
        # cast floating tensor arguments to a bfloat16 layer's compute dtype, and RoPE
        # angles must stay float32.
        if cache_positions is not None:
            rotary_tables = cache_positions.rotary_tables(
                self.head_dim, self.rope_max_wavelength, self.rope_scaling_factor
            )
        else:
            if positions is None:
                query_length = ops.shape(inputs)[1]
                positions = ops.arange(query_length, dtype="int32") + ops.cast(
                    cache_update_index, "int32"
                )
            rotary_tables = self._rotary_tables(positions)
        # A decode step projects [batch, hidden] rows: reshaped once for the three products.
        rows = None
        if inputs.shape[1] == 1 and inputs.shape[0] is not None:
            rows = ops.reshape(inputs, (inputs.shape[0], inputs.shape[2]))
        denses = (self.query_dense, self.key_dense, self.value_dense)
        if rows is not None and all(is_decode_step(dense, inputs) for dense in denses):
            products = decode_products(
                rows, [ops.cast(dense.kernel, dense.compute_dtype) for dense in denses])
            query, key, value = (
                ops.reshape(product, (rows.shape[0], 1, -1, self.head_dim))
                for product in products
            )
        else:
            query, key, value = (
                _project_to_heads(dense, inputs, rows, training) for dense in denses)
        if self.use_query_key_norm:
            query = self.query_norm(query)
            key = self.key_norm(key)
        query = apply_rotary(query, rotary_tables)
        key = apply_rotary(key, rotary_tables)
        if cache is not None:
            # One write of both, then attention reads the whole cache.
            cache = write_to_cache(cache, cache_update_index, ops.stack((key, value), axis=1))
            key, value = cache[:, 0], cache[:, 1]
        output = self._attend(query, key, value, attention_mask, training, cache_positions)
        output = _project_from_heads(
            self.output_dense, output, self.num_query_heads, self.head_dim, training
        )
        if cache is not None:
            return output, cache
        return output

    def _rotary_tables(self, positions):
        return rotary_tables(
            positions, self.head_dim, self.rope_max_wavelength, self.rope_scaling_factor
        )

    def _attend(self, query, key, value, attention_mask, training, cache_positions=None):
        """Attention output [batch, seq, kv_heads, groups, head_dim]; `cache_positions`, if
        given, keeps what is derived from its masks for the other blocks of the call."""
        groups = self.num_query_heads // self.num_key_value_heads
        batch, query_length = ops.shape(query)[0], ops.shape(query)[1]
        query = ops.reshape(
            query,
            (batch, query_length, self.num_key_value_heads, groups, self.head_dim),
        )
        dropout_active = bool(training) and self.dropout > 0
        if torch_attention.applies(
            query, attention_mask, self.attention_logit_soft_cap, dropout_active
        ):
            def additive(mask):
                return torch_attention.additive_mask(mask, query.dtype, _MASKED_LOGIT)

            if cache_positions is None:
                mask = additive(attention_mask)
            else:  # once per call (a 4,096-token prompt: 0.8 s for 18 blocks' conversions)
                mask = cache_positions.derived(
                    attention_mask, ("additive", str(query.dtype)), additive)
            return torch_attention.attend(
                query, key, value, mask, self.query_pre_attn_scalar**-0.5)
        query = query * ops.cast(self.query_pre_attn_scalar**-0.5, query.dtype)
        logits = ops.einsum("bqkgh,bskh->bkgqs", query, key)
        logits = ops.cast(logits, "float32")
        if self.attention_logit_soft_cap is not None:
            cap = self.attention_logit_soft_cap
            logits = ops.tanh(logits / cap) * cap
        mask = attention_mask
        if len(mask.shape) == 3:
            mask = ops.expand_dims(mask, (1, 2))
        logits = ops.where(mask, logits, _MASKED_LOGIT)
        probabilities = ops.softmax(logits, axis=-1)
        probabilities = self.dropout_layer(
            ops.cast(probabilities, self.compute_dtype), training=training
        )
        return ops.einsum("bkgqs,bskh->bqkgh", probabilities, value)

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
