"""GemmaBackbone: token ids and a padding mask in, final-normalized hidden states out."""

import math
import warnings

import keras
from keras import ops

from keras_gemma.architecture_checks import check_architecture
from keras_gemma.checkpoints.preset_cards import PresetMapping
from keras_gemma.collect_once import one_collection
from keras_gemma.layers.decoder_block import GemmaDecoderBlock
from keras_gemma.layers.initialization import initializer
from keras_gemma.layers.normalization import RMSNormalization
from keras_gemma.layers.tied_embedding import GemmaReversibleEmbedding
from keras_gemma.lora import LoraMethods


@keras.saving.register_keras_serializable(package="keras_gemma")
class GemmaBackbone(LoraMethods, keras.Model):
    """The Gemma decoder stack, for Gemma 1, 1.1, CodeGemma, Gemma 2 and Gemma 3 (text).

    A functional model from `{"token_ids": int [batch, seq], "padding_mask": [batch, seq]}`
    to final-normalized hidden states `[batch, seq, hidden_dim]`. Logits come from the tied
    embedding: `backbone.token_embedding(hidden, reverse=True)` (soft-capped when
    `final_logit_soft_cap` is set). Argument names follow KerasHub's `GemmaBackbone`; the
    later generations are switches, all off for Gemma 1.

    For packed training rows (`GemmaCausalLMPreprocessor(packing=True)`) `padding_mask` holds
    segment ids instead of 0/1: 0 is padding and k the row's k-th example; each token then
    attends only within its example and rotary positions restart at each example. A 0/1 mask
    is the ordinary padding mask. The cached (generation) path reads only 0/1 masks.

    Args:
        vocabulary_size: number of tokens.
        num_layers: number of decoder blocks.
        num_query_heads: attention heads for queries.
        num_key_value_heads: heads for keys and values (1 is multi-query attention).
        hidden_dim: width of the residual stream.
        intermediate_dim: twice the feed-forward width (KerasHub's convention).
        head_dim: width of each attention head.
        layer_norm_epsilon: epsilon of every RMS norm.
        dropout: dropout rate while training.
        query_head_dim_normalize: when `query_pre_attn_scalar` is None, scale queries by
            `head_dim ** -0.5` (True) or `(hidden_dim / num_query_heads) ** -0.5` (False).
        query_pre_attn_scalar: queries are scaled by `query_pre_attn_scalar ** -0.5`;
            overrides `query_head_dim_normalize`.
        use_post_attention_norm, use_post_ffw_norm: Gemma 2/3 branch-output norms.
        use_query_key_norm: Gemma 3 RMS norm on queries and keys.
        attention_logit_soft_cap: Gemma 2's tanh cap on attention logits (50).
        final_logit_soft_cap: Gemma 2's tanh cap on output logits (30).
        use_sliding_window_attention: give local layers a sliding window.
        sliding_window_size: the window of local layers.
        sliding_window_pattern: every `sliding_window_pattern`-th layer is global (attends
            to everything); the others are local. Gemma 2: 2; Gemma 3: 6.
        local_rope_max_wavelength, global_rope_max_wavelength: RoPE bases of local and
            global layers (Gemma 3: 10,000 and 1,000,000).
        local_rope_scaling_factor, global_rope_scaling_factor: linear RoPE scaling.
        dtype: the dtype policy, e.g. "float32", "bfloat16" or "mixed_bfloat16".

    Example:
    >>> backbone = GemmaBackbone(
    ...     vocabulary_size=100, num_layers=2, num_query_heads=2, num_key_value_heads=1,
    ...     hidden_dim=16, intermediate_dim=32, head_dim=8)
    >>> inputs = {"token_ids": np.array([[2, 5, 7]]), "padding_mask": np.array([[1, 1, 1]])}
    >>> hidden = backbone(inputs)                       # [1, 3, 16]
    >>> logits = backbone.token_embedding(hidden, reverse=True)   # [1, 3, 100]
    """

    presets = PresetMapping()

    def __init__(
        self,
        vocabulary_size,
        num_layers,
        num_query_heads,
        num_key_value_heads,
        hidden_dim,
        intermediate_dim,
        head_dim,
        layer_norm_epsilon=1e-6,
        dropout=0.0,
        query_head_dim_normalize=True,
        query_pre_attn_scalar=None,
        use_post_attention_norm=False,
        use_post_ffw_norm=False,
        use_query_key_norm=False,
        attention_logit_soft_cap=None,
        final_logit_soft_cap=None,
        use_sliding_window_attention=False,
        sliding_window_size=4096,
        sliding_window_pattern=2,
        local_rope_max_wavelength=10000.0,
        global_rope_max_wavelength=10000.0,
        local_rope_scaling_factor=1.0,
        global_rope_scaling_factor=1.0,
        dtype=None,
        **kwargs,
    ):
        # Every size and switch checked before a layer is built: a negative layer count
        # would otherwise surface as an error from inside a norm layer.
        check_architecture({
            key: value for key, value in locals().items() if key not in ("self", "kwargs", "dtype")
        })
        scalar = query_pre_attn_scalar
        if scalar is None:
            scalar = head_dim if query_head_dim_normalize else hidden_dim // num_query_heads

        # Layers are made as locals and attached after Model.__init__: the torch backend
        # refuses module attributes before it.
        token_embedding = GemmaReversibleEmbedding(
            input_dim=vocabulary_size,
            output_dim=hidden_dim,
            tie_weights=True,
            embeddings_initializer=initializer(
                keras.initializers.VarianceScaling(
                    scale=1.0, mode="fan_in", distribution="untruncated_normal"
                )
            ),
            logit_soft_cap=final_logit_soft_cap,
            dtype=dtype,
            name="token_embedding",
        )
        transformer_layers = []
        for index in range(num_layers):
            is_global = self.is_global_layer(
                index, use_sliding_window_attention, sliding_window_pattern
            )
            transformer_layers.append(
                GemmaDecoderBlock(
                    hidden_dim=hidden_dim,
                    intermediate_dim=intermediate_dim,
                    num_query_heads=num_query_heads,
                    num_key_value_heads=num_key_value_heads,
                    head_dim=head_dim,
                    query_pre_attn_scalar=scalar,
                    attention_logit_soft_cap=attention_logit_soft_cap,
                    use_query_key_norm=use_query_key_norm,
                    rope_max_wavelength=(
                        global_rope_max_wavelength if is_global else local_rope_max_wavelength
                    ),
                    rope_scaling_factor=(
                        global_rope_scaling_factor if is_global else local_rope_scaling_factor
                    ),
                    sliding_window_size=None if is_global else sliding_window_size,
                    use_post_attention_norm=use_post_attention_norm,
                    use_post_ffw_norm=use_post_ffw_norm,
                    layer_norm_epsilon=layer_norm_epsilon,
                    dropout=dropout,
                    dtype=dtype,
                    name=f"decoder_block_{index}",
                )
            )
        final_normalization = RMSNormalization(
            epsilon=layer_norm_epsilon, dtype=dtype, name="final_normalization"
        )

        token_ids = keras.Input(shape=(None,), dtype="int32", name="token_ids")
        padding_mask = keras.Input(shape=(None,), dtype="int32", name="padding_mask")
        x = token_embedding(token_ids)
        x = x * ops.cast(math.sqrt(hidden_dim), x.dtype)
        for block in transformer_layers:
            x = block(x, padding_mask=padding_mask)
        hidden = final_normalization(x)
        super().__init__(
            inputs={"token_ids": token_ids, "padding_mask": padding_mask},
            outputs=hidden,
            dtype=dtype,
            **kwargs,
        )
        # A Functional model ignores `dtype`; without this, `compute_dtype` would say float32 for
        # a bfloat16 model (and its KV caches, sized from it, would be float32).
        self.dtype_policy = token_embedding.dtype_policy
        self.token_embedding = token_embedding
        self.transformer_layers = transformer_layers
        self.final_normalization = final_normalization

        self.vocabulary_size = vocabulary_size
        self.num_layers = num_layers
        self.num_query_heads = num_query_heads
        self.num_key_value_heads = num_key_value_heads
        self.hidden_dim = hidden_dim
        self.intermediate_dim = intermediate_dim
        self.head_dim = head_dim
        self.layer_norm_epsilon = layer_norm_epsilon
        self.dropout = dropout
        self.query_head_dim_normalize = query_head_dim_normalize
        self.query_pre_attn_scalar = query_pre_attn_scalar
        self.use_post_attention_norm = use_post_attention_norm
        self.use_post_ffw_norm = use_post_ffw_norm
        self.use_query_key_norm = use_query_key_norm
        self.attention_logit_soft_cap = attention_logit_soft_cap
        self.final_logit_soft_cap = final_logit_soft_cap
        self.use_sliding_window_attention = use_sliding_window_attention
        self.sliding_window_size = sliding_window_size
        self.sliding_window_pattern = sliding_window_pattern
        self.local_rope_max_wavelength = local_rope_max_wavelength
        self.global_rope_max_wavelength = global_rope_max_wavelength
        self.local_rope_scaling_factor = local_rope_scaling_factor
        self.global_rope_scaling_factor = global_rope_scaling_factor
        self._resolve_policy_map()

    def _resolve_policy_map(self):
        """Gives each layer built from a `DTypePolicyMap` its own policy from the map.

        Keras looks a layer's policy up in the map on every `compute_dtype` or
        `quantization_mode` read, trying each of the map's patterns as a regular expression:
        for a quantized 270M that was ~100 ms of a 117 ms one-token `generate` on torch
        (905 lookups x ~126 patterns; measured 2026-12-06). The policies do not change
        meanwhile: `quantize` sets a layer's own policy, and `_dtype_policy_for_config`
        rebuilds the map from the layers for saving.
        """
        policy_map = self._dtype_policy
        if not isinstance(policy_map, keras.dtype_policies.DTypePolicyMap):
            return
        for layer in self._flatten_layers(include_self=False):
            if layer.path and isinstance(layer._dtype_policy, keras.dtype_policies.DTypePolicyMap):
                layer._dtype_policy = layer._dtype_policy[layer.path]
        self._dtype_policy = policy_map.default_policy

    @property
    def layer_norm(self):
        """The final normalization under KerasHub's attribute name (its layer name is ours)."""
        return self.final_normalization

    def save_to_preset(self, preset_dir):
        """Writes this backbone (config and weights) as a keras_gemma preset directory."""
        from keras_gemma.checkpoints.preset_format import save_preset

        return save_preset(preset_dir, self)

    @staticmethod
    def is_global_layer(index, use_sliding_window_attention, sliding_window_pattern):
        """Whether layer `index` attends globally (every `pattern`-th layer, 1-based)."""
        if not use_sliding_window_attention:
            return True
        return (index + 1) % sliding_window_pattern == 0

    def get_config(self):
        return {
            "vocabulary_size": self.vocabulary_size,
            "num_layers": self.num_layers,
            "num_query_heads": self.num_query_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "hidden_dim": self.hidden_dim,
            "intermediate_dim": self.intermediate_dim,
            "head_dim": self.head_dim,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "dropout": self.dropout,
            "query_head_dim_normalize": self.query_head_dim_normalize,
            "query_pre_attn_scalar": self.query_pre_attn_scalar,
            "use_post_attention_norm": self.use_post_attention_norm,
            "use_post_ffw_norm": self.use_post_ffw_norm,
            "use_query_key_norm": self.use_query_key_norm,
            "attention_logit_soft_cap": self.attention_logit_soft_cap,
            "final_logit_soft_cap": self.final_logit_soft_cap,
            "use_sliding_window_attention": self.use_sliding_window_attention,
            "sliding_window_size": self.sliding_window_size,
            "sliding_window_pattern": self.sliding_window_pattern,
            "local_rope_max_wavelength": self.local_rope_max_wavelength,
            "global_rope_max_wavelength": self.global_rope_max_wavelength,
            "local_rope_scaling_factor": self.local_rope_scaling_factor,
            "global_rope_scaling_factor": self.global_rope_scaling_factor,
            "dtype": keras.dtype_policies.serialize(self._dtype_policy_for_config()),
        }

    def _dtype_policy_for_config(self):
        """The policy to rebuild this model with: the layers' own (Functional may not keep
        the model's), or, once some layers are quantized, a `DTypePolicyMap` naming them so
        that a saved quantized model is rebuilt with int8/int4 variables and never in float."""
        policy = self.final_normalization.dtype_policy
        quantized = {
            layer.path: layer.dtype_policy
            for layer in self._flatten_layers(include_self=False)
            if layer.quantization_mode is not None
        }
        if not quantized:
            return policy
        return keras.dtype_policies.DTypePolicyMap(default_policy=policy, policy_map=quantized)

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if isinstance(config.get("dtype"), dict):
            config["dtype"] = keras.dtype_policies.deserialize(config["dtype"])
        return cls(**config)

    @staticmethod
    def get_layout_map(
        device_mesh, model_parallel_dim_name="model", data_parallel_dim_name="batch"
    ):
        """A `keras.distribution.LayoutMap` sharding this model over the mesh's model axis.

        Fits every shipped preset (one KV head and Gemma 3 included) and LoRA: vocabulary,
        head_dim (not heads: some presets have 1 KV head or 4 query heads) and FFN width are
        sharded, norms replicated, weights replicated along the data axis; the axes and their
        reasons are in `keras_gemma.distribution`, whose `check_layout` names any weight a mesh
        does not divide. keras.distribution is JAX-only (Keras 3.15.1).

        Example:
        >>> layout_map = GemmaBackbone.get_layout_map(mesh)        # DeviceMesh (1, 8)
        >>> check_layout("gemma_2b_en", layout_map)
        >>> keras.distribution.set_distribution(keras.distribution.ModelParallel(
        ...     layout_map=layout_map, batch_dim_name="batch"))
        """
        from keras_gemma.distribution import layout_map

        return layout_map(device_mesh, model_parallel_dim_name, data_parallel_dim_name)

    @staticmethod
    def parameter_count(config):
        """Number of weights of the architecture `config`, computed without building it.

        Example:
        >>> GemmaBackbone.parameter_count(dict(vocabulary_size=256000, num_layers=18,
        ...     num_query_heads=8, num_key_value_heads=1, hidden_dim=2048,
        ...     intermediate_dim=32768, head_dim=256))
        2506172416
        """
        hidden = config["hidden_dim"]
        head_dim = config["head_dim"]
        attention = hidden * head_dim * (
            2 * config["num_query_heads"] + 2 * config["num_key_value_heads"]
        )
        feed_forward = 3 * hidden * (config["intermediate_dim"] // 2)
        norms = hidden * (
            2
            + bool(config.get("use_post_attention_norm"))
            + bool(config.get("use_post_ffw_norm"))
        )
        if config.get("use_query_key_norm"):
            norms += 2 * head_dim
        per_layer = attention + feed_forward + norms
        return config["vocabulary_size"] * hidden + config["num_layers"] * per_layer + hidden

    def quantize(self, mode=None, *args, check_memory=True, **kwargs):
        """Keras' `Model.quantize` (e.g. "int8"), with one garbage collection in all and no
        warning for each layer that has nothing to quantize (norms, dropout).

        First checks that the quantized weights fit beside the float ones (a `MemoryError`
        names the figures otherwise; `check_memory=False` or KERAS_GEMMA_SKIP_MEMORY_CHECK=1
        skips the check, see checkpoints/memory_preflight.py).

        `quantize("gptq", config=keras.quantizers.GPTQConfig(dataset, tokenizer))` writes
        int4 weights calibrated on the dataset's text (keras_gemma's GPTQ, see
        gptq_quantization.py: the real Gemma 3 270M's perplexity +1.8% where round-to-nearest
        int4 gives +31.6%).

        Example:
        >>> backbone.quantize("int8")
        """
        from keras_gemma.checkpoints.memory_preflight import check_quantize

        config = kwargs.get("config", args[0] if args else None)
        if mode == "gptq" or isinstance(config, keras.quantizers.GPTQConfig):
            # keras_gemma's own GPTQ, into plain int4 variables (gptq_quantization.py).
            from keras_gemma.gptq_quantization import quantize_with_gptq

            check_quantize(self, "int4", check_memory)
            quantize_with_gptq(self, config, kwargs.get("filters", args[1] if len(args) > 1 else None))
            self.train_function = self.test_function = self.predict_function = None
            self._post_quantize("int4")
            return
        if mode == "awq":
            raise ValueError(
                "keras_gemma does not implement quantize('awq'); for calibrated int4 use "
                "quantize('gptq', config=keras.quantizers.GPTQConfig(dataset, tokenizer))."
            )
        check_quantize(self, mode, check_memory)
        with one_collection(), warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message=".*does not have a `quantize` method", category=UserWarning
            )
            super().quantize(mode, *args, **kwargs)

    @classmethod
    def from_preset(
        cls, preset, dtype=None, load_weights=True, quantize=None, check_memory=True, **kwargs
    ):
        """Builds a backbone from a preset name, a checkpoint directory or a handle.

        `preset` is a name from `keras_gemma.list_presets()`, a local directory (keras_gemma,
        KerasHub or transformers format), a .gguf file, `kaggle://owner/model/framework/
        variation[/version]` or `hf://org/repo`. `dtype` picks the weights' dtype;
        `quantize="int8"` or `"int4"` quantizes each weight as it is read, so the model is
        never whole in float (keras_gemma presets and GGUF files).

        Before anything is allocated, the memory the load needs at its peak is compared with
        what this process may still take (cgroup limits and the host's free memory); a load
        that cannot fit raises `MemoryError` with both figures and the ways out.
        `check_memory=False`, or the environment variable KERAS_GEMMA_SKIP_MEMORY_CHECK=1,
        skips the check.

        Example:
        >>> backbone = GemmaBackbone.from_preset("./my_transformers_gemma_dir")
        >>> backbone = GemmaBackbone.from_preset("gemma_2b_en", dtype="bfloat16")
        >>> backbone = GemmaBackbone.from_preset("gemma_2b_en", quantize="int8")
        """
        from keras_gemma.checkpoints.loader import build_backbone

        if kwargs:
            raise TypeError(f"unexpected arguments to from_preset: {sorted(kwargs)}.")
        return build_backbone(
            cls, preset, dtype=dtype, with_weights=load_weights, quantize=quantize,
            check_memory=check_memory,
        )

    @classmethod
    def from_gemma_arguments(cls, arguments, resolved=None):
        """Builds this class from `GemmaBackbone` arguments read from a checkpoint.

        The loader reads a preset into GemmaBackbone's arguments (`resolved` says what it
        read); a subclass that takes other arguments (`Gemma3Backbone`) translates them here.
        """
        return cls.from_config(arguments)
