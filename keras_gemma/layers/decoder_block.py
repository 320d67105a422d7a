"""One Gemma decoder block."""

import keras

from keras_gemma.layers.attention import CachePositions
from keras_gemma.layers.attention import GemmaAttention, compute_attention_mask
from keras_gemma.layers.attention import segment_mask_and_positions
from keras_gemma.layers.block_remat import rematerialized_block_call
from keras_gemma.layers.feed_forward import build_feed_forward
from keras_gemma.layers.feed_forward import feed_forward_projections
from keras_gemma.layers.feed_forward import gated_feed_forward
from keras_gemma.layers.normalization import RMSNormalization


@keras.saving.register_keras_serializable(package="keras_gemma")
class GemmaDecoderBlock(keras.layers.Layer):
    """norm -> attention -> (post-norm) -> residual -> norm -> FFN -> (post-norm) -> residual.

    The same block serves every generation: Gemma 1 has no post-norms and no window;
    Gemma 2 adds post-norms, an attention soft-cap and a sliding window on alternate
    layers; Gemma 3 adds QK-norm and per-layer RoPE wavelengths.

    Args:
        hidden_dim, intermediate_dim, num_query_heads, num_key_value_heads, head_dim,
        query_pre_attn_scalar, attention_logit_soft_cap, use_query_key_norm,
        rope_max_wavelength, rope_scaling_factor: as in `GemmaAttention`;
            `intermediate_dim` is twice the feed-forward width (see feed_forward.py).
        sliding_window_size: if set, this layer only attends to the last
            `sliding_window_size` positions (the query's own included).
        use_post_attention_norm, use_post_ffw_norm: normalize each branch's output
            before the residual add.
        layer_norm_epsilon: epsilon of every norm in the block.
        dropout: dropout rate while training.

    Example:
    >>> block = GemmaDecoderBlock(16, 64, 2, 1, 8, query_pre_attn_scalar=8)
    >>> block(keras.ops.ones((1, 4, 16)), padding_mask=keras.ops.ones((1, 4))).shape
    (1, 4, 16)
    """

    def __init__(
        self,
        hidden_dim,
        intermediate_dim,
        num_query_heads,
        num_key_value_heads,
        head_dim,
        query_pre_attn_scalar,
        attention_logit_soft_cap=None,
        use_query_key_norm=False,
        rope_max_wavelength=10000.0,
        rope_scaling_factor=1.0,
        sliding_window_size=None,
        use_post_attention_norm=False,
        use_post_ffw_norm=False,
        layer_norm_epsilon=1e-6,
        dropout=0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.hidden_dim = hidden_dim
        self.intermediate_dim = intermediate_dim
        self.num_query_heads = num_query_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.query_pre_attn_scalar = query_pre_attn_scalar
        self.attention_logit_soft_cap = attention_logit_soft_cap
        self.use_query_key_norm = use_query_key_norm
        self.rope_max_wavelength = rope_max_wavelength
        self.rope_scaling_factor = rope_scaling_factor
        self.sliding_window_size = sliding_window_size
        self.use_post_attention_norm = use_post_attention_norm
        self.use_post_ffw_norm = use_post_ffw_norm
        self.layer_norm_epsilon = layer_norm_epsilon
        self.dropout = dropout

        policy = self.dtype_policy

        def norm(name):
            return RMSNormalization(epsilon=layer_norm_epsilon, dtype=policy, name=name)

        self.pre_attention_norm = norm("pre_attention_norm")
        self.attention = GemmaAttention(
            num_query_heads=num_query_heads,
            num_key_value_heads=num_key_value_heads,
            head_dim=head_dim,
            query_pre_attn_scalar=query_pre_attn_scalar,
            attention_logit_soft_cap=attention_logit_soft_cap,
            use_query_key_norm=use_query_key_norm,
            rope_max_wavelength=rope_max_wavelength,
            rope_scaling_factor=rope_scaling_factor,
            layer_norm_epsilon=layer_norm_epsilon,
            dropout=dropout,
            dtype=policy,
            name="attention",
        )
        self.post_attention_norm = norm("post_attention_norm") if use_post_attention_norm else None
        self.pre_ffw_norm = norm("pre_ffw_norm")
        # KerasHub's layer names (and attribute names), so that code addressing layers by
        # name (layout maps, LoRA targets, weight surgery) works unchanged.
        self.gating_ffw, self.gating_ffw_2, self.ffw_linear = feed_forward_projections(
            hidden_dim, intermediate_dim, policy
        )
        self.post_ffw_norm = norm("post_ffw_norm") if use_post_ffw_norm else None
        self.dropout_layer = keras.layers.Dropout(dropout, dtype=policy)

    def build(self, input_shape):
        for layer in (
            self.pre_attention_norm,
            self.attention,
            self.post_attention_norm,
            self.pre_ffw_norm,
            self.post_ffw_norm,
        ):
            if layer is not None:
                layer.build(input_shape)
        build_feed_forward(self.gating_ffw, self.gating_ffw_2, self.ffw_linear, input_shape)
        self.built = True

    def call(
        self,
        inputs,
        padding_mask=None,
        cache=None,
        cache_update_index=0,
        training=False,
        cache_positions=None,
    ):
        """Runs the block on `inputs` [batch, seq, hidden].

        `padding_mask` [batch, keys] marks real tokens (keys are the inputs, or the cache's
        positions when a cache [batch, 2, max_length, kv_heads, head_dim] is given). With a
        cache, returns `(outputs, updated_cache)`; `cache_positions`, a `CachePositions` the
        caller made once for all blocks of the call, then holds the masks and rotary tables
        (and `padding_mask` and `cache_update_index` are read from it). Without a cache
        (training, scoring) the mask may hold segment ids of packed examples (see
        `segment_mask_and_positions`).
        """
        positions = None
        if cache is None:
            query_length = keras.ops.shape(inputs)[1]
            mask = compute_attention_mask(
                query_length, query_length, sliding_window_size=self.sliding_window_size
            )
            if padding_mask is not None:
                visible, positions = segment_mask_and_positions(padding_mask)
                mask = keras.ops.logical_and(mask, visible)
        else:
            if cache_positions is None:
                cache_positions = CachePositions(
                    keras.ops.shape(inputs)[1],
                    keras.ops.shape(cache)[2],
                    start_index=cache_update_index,
                    padding_mask=padding_mask,
                )
            cache_update_index = cache_positions.start_index
            mask = cache_positions.attention_mask(self.sliding_window_size)
        x = self.pre_attention_norm(inputs)
        attended = self.attention(
            x,
            attention_mask=mask,
            cache=cache,
            cache_update_index=cache_update_index,
            training=training,
            positions=positions,
            cache_positions=cache_positions,
        )
        if cache is not None:
            attended, cache = attended
        if self.post_attention_norm is not None:
            attended = self.post_attention_norm(attended)
        x = inputs + self.dropout_layer(attended, training=training)
        transformed = gated_feed_forward(
            self.gating_ffw, self.gating_ffw_2, self.ffw_linear, self.pre_ffw_norm(x), training
        )
        if self.post_ffw_norm is not None:
            transformed = self.post_ffw_norm(transformed)
        x = x + self.dropout_layer(transformed, training=training)
        if cache is not None:
            return x, cache
        return x

    def rematerialized_call(self, layer_call, *args, **kwargs):
        """Keras' rematerialization (`keras.RematScope`) in a form that saves memory here.

        See block_remat.py: only tensors pass through the checkpoint, and under XLA on a
        CPU the recomputation is tied to the backward pass. A call with a KV cache
        (generation) has no backward pass and is never rematerialized.
        """
        rematerialized = super().rematerialized_call(layer_call, *args, **kwargs)
        if rematerialized is layer_call or kwargs.get("cache") is not None:
            return layer_call

        def call(inputs, padding_mask=None, **options):
            return rematerialized_block_call(self, layer_call, inputs, padding_mask, options)

        return call

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "hidden_dim": self.hidden_dim,
                "intermediate_dim": self.intermediate_dim,
                "num_query_heads": self.num_query_heads,
                "num_key_value_heads": self.num_key_value_heads,
                "head_dim": self.head_dim,
                "query_pre_attn_scalar": self.query_pre_attn_scalar,
                "attention_logit_soft_cap": self.attention_logit_soft_cap,
                "use_query_key_norm": self.use_query_key_norm,
                "rope_max_wavelength": self.rope_max_wavelength,
                "rope_scaling_factor": self.rope_scaling_factor,
                "sliding_window_size": self.sliding_window_size,
                "use_post_attention_norm": self.use_post_attention_norm,
                "use_post_ffw_norm": self.use_post_ffw_norm,
                "layer_norm_epsilon": self.layer_norm_epsilon,
                "dropout": self.dropout,
            }
        )
        return config
