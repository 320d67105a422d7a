"""Gemma3Backbone: KerasHub's Gemma 3 constructor arguments, built as our GemmaBackbone."""

import contextlib
import inspect

import keras

from keras_gemma.backbone import GemmaBackbone
from keras_gemma.checkpoints.keras_hub import backbone_config_from_keras_hub

TEXT_ONLY = (
    "keras_gemma is text-only: it has no vision encoder. Use a text-only Gemma 3 "
    "(vision_encoder=None; presets such as gemma3_1b, gemma3_4b_text), or KerasHub for images."
)

# KerasHub 0.32's Gemma3Backbone arguments after `image_size` that have defaults, in its order.
_DEFAULTS = {
    "query_head_dim_normalize": True,
    "use_query_key_norm": True,
    "use_post_ffw_norm": False,
    "use_post_attention_norm": False,
    "attention_logit_soft_cap": None,
    "final_logit_soft_cap": None,
    "use_sliding_window_attention": False,
    "sliding_window_size": 1024,
    "local_rope_scaling_factor": 1.0,
    "global_rope_scaling_factor": 1.0,
    "vision_encoder": None,
    "layer_norm_epsilon": 1e-6,
    "use_bidirectional_attention": False,
    "dropout": 0,
    "is_embedding_model": False,
    "pooling_intermediate_dim": None,
    "embedding_dim": None,
}
_REQUIRED = (
    "vocabulary_size", "image_size", "num_layers", "num_query_heads", "num_key_value_heads",
    "hidden_dim", "intermediate_dim", "head_dim",
)
ARGUMENTS = _REQUIRED + tuple(_DEFAULTS)


def gemma_backbone_arguments(keras_hub_arguments):
    """GemmaBackbone arguments for KerasHub Gemma3Backbone arguments (text only).

    One mapping for the class and for KerasHub preset files: the checkpoint converter's.

    Example:
    >>> gemma_backbone_arguments(dict(vocabulary_size=100, image_size=None, num_layers=2,
    ...     num_query_heads=2, num_key_value_heads=1, hidden_dim=16, intermediate_dim=32,
    ...     head_dim=8))["intermediate_dim"]
    64
    """
    arguments = {**_DEFAULTS, **keras_hub_arguments}
    if arguments["vision_encoder"] not in (None, {}):
        raise ValueError(f"Gemma3Backbone: got a vision_encoder. {TEXT_ONLY}")
    if arguments["is_embedding_model"] or arguments["use_bidirectional_attention"]:
        raise ValueError(
            "Gemma3Backbone: keras_gemma builds causal language models; is_embedding_model and "
            "use_bidirectional_attention (EmbeddingGemma) are not supported."
        )
    return backbone_config_from_keras_hub(
        {"registered_name": "keras_hub>Gemma3Backbone", "config": arguments}
    )


def _with_gemma_defaults(config):
    defaults = {
        name: parameter.default
        for name, parameter in inspect.signature(GemmaBackbone.__init__).parameters.items()
        if parameter.default is not inspect.Parameter.empty
    }
    return {**defaults, **config}


def _architecture(config):
    """What a GemmaBackbone config builds, whatever the spelling: the shared sizes and
    switches, the query scale, and each layer's (window, RoPE wavelength, RoPE scaling)."""
    c = _with_gemma_defaults(config)
    scalar = c["query_pre_attn_scalar"]
    if scalar is None:
        scalar = c["head_dim"] if c["query_head_dim_normalize"] else (
            c["hidden_dim"] // c["num_query_heads"]
        )
    layers = []
    for index in range(c["num_layers"]):
        is_global = GemmaBackbone.is_global_layer(
            index, c["use_sliding_window_attention"], c["sliding_window_pattern"]
        )
        kind = "global" if is_global else "local"
        layers.append((
            None if is_global else c["sliding_window_size"],
            float(c[f"{kind}_rope_max_wavelength"]),
            float(c[f"{kind}_rope_scaling_factor"]),
        ))
    shared = (
        "vocabulary_size", "num_layers", "num_query_heads", "num_key_value_heads",
        "hidden_dim", "intermediate_dim", "head_dim", "layer_norm_epsilon", "dropout",
        "use_post_attention_norm", "use_post_ffw_norm", "use_query_key_norm",
        "attention_logit_soft_cap", "final_logit_soft_cap",
    )
    return {
        **{key: c[key] for key in shared},
        "query scale": float(scalar),
        "layers (window, RoPE wavelength, RoPE scaling)": layers,
    }


def keras_hub_arguments(config):
    """The KerasHub Gemma3Backbone arguments that build the GemmaBackbone `config`.

    Raises ValueError when no such arguments exist (Gemma 1 and 2, whose layer pattern and
    RoPE KerasHub's Gemma 3 class cannot express).

    Example:
    >>> keras_hub_arguments(GemmaBackbone.from_preset("gemma3_270m").get_config())
    """
    config = _with_gemma_defaults(config)
    head_dim = config["head_dim"]
    scale = _architecture(config)["query scale"]
    candidate = {key: config[key] for key in ARGUMENTS if key in config}
    candidate.update(
        image_size=None,
        vision_encoder=None,
        intermediate_dim=config["intermediate_dim"] // 2,
        query_head_dim_normalize=scale == head_dim,
        use_bidirectional_attention=False,
        is_embedding_model=False,
        pooling_intermediate_dim=None,
        embedding_dim=None,
    )
    wanted = _architecture(config)
    built = _architecture(gemma_backbone_arguments(candidate))
    differences = [key for key in wanted if wanted[key] != built[key]]
    if differences:
        raise ValueError(
            f"this checkpoint is not a Gemma 3 architecture that Gemma3Backbone can express "
            f"(it differs in {differences}); load it with keras_gemma.GemmaBackbone / "
            "GemmaCausalLM instead."
        )
    return {key: candidate[key] for key in ARGUMENTS}


@keras.saving.register_keras_serializable(package="keras_gemma")
class Gemma3Backbone(GemmaBackbone):
    """KerasHub's `Gemma3Backbone` for text: its constructor arguments, our GemmaBackbone.

    Takes the arguments of `keras_hub.models.Gemma3Backbone` (KerasHub 0.32) with their
    meaning there, and builds the same decoder as a `GemmaBackbone`:
    - `intermediate_dim` is the feed-forward width (GemmaBackbone's is twice it);
    - with `use_sliding_window_attention`, every 6th layer is global (RoPE wavelength
      1,000,000 and `global_rope_scaling_factor`), the other five local (wavelength 10,000,
      `local_rope_scaling_factor`, window `sliding_window_size`); without it every layer is
      global;
    - `query_head_dim_normalize`: queries scaled by `head_dim ** -0.5` (True) or
      `(hidden_dim // num_query_heads) ** -0.5` (False, Gemma 3 27B). KerasHub 0.32 ignores
      this argument and always uses `head_dim`; we apply it, as Google's and transformers'
      Gemma 3 do.
    - `layer_norm_epsilon` is every norm's epsilon, the query/key norms' included (as in
      transformers). KerasHub 0.32 keeps 1e-6 for those two; every Gemma 3 checkpoint uses
      1e-6, so the two agree on all of them.

    Text only: a `vision_encoder` raises a ValueError, and so do `is_embedding_model` and
    `use_bidirectional_attention`. `image_size` is accepted and kept in the config (KerasHub
    requires it and its text-only presets store a value), but nothing uses it.
    `get_config()` returns KerasHub's argument names; `save_to_preset()` writes a keras_gemma
    preset (that `GemmaBackbone.from_preset` reads as well).

    Example:
    >>> backbone = keras_gemma.Gemma3Backbone(
    ...     vocabulary_size=1000, image_size=None, num_layers=7, num_query_heads=4,
    ...     num_key_value_heads=2, hidden_dim=32, intermediate_dim=32, head_dim=12,
    ...     use_post_ffw_norm=True, use_post_attention_norm=True,
    ...     use_sliding_window_attention=True, sliding_window_size=4)
    >>> backbone.intermediate_dim, backbone.gemma_backbone_config()["intermediate_dim"]
    (32, 64)
    >>> backbone = keras_gemma.Gemma3Backbone.from_preset("gemma3_270m")
    """

    def __init__(
        self,
        vocabulary_size,
        image_size,
        num_layers,
        num_query_heads,
        num_key_value_heads,
        hidden_dim,
        intermediate_dim,
        head_dim,
        query_head_dim_normalize=True,
        use_query_key_norm=True,
        use_post_ffw_norm=False,
        use_post_attention_norm=False,
        attention_logit_soft_cap=None,
        final_logit_soft_cap=None,
        use_sliding_window_attention=False,
        sliding_window_size=1024,
        local_rope_scaling_factor=1.0,
        global_rope_scaling_factor=1.0,
        vision_encoder=None,
        layer_norm_epsilon=1e-6,
        use_bidirectional_attention=False,
        dropout=0,
        is_embedding_model=False,
        pooling_intermediate_dim=None,
        embedding_dim=None,
        dtype=None,
        **kwargs,
    ):
        arguments = {
            name: value for name, value in locals().items() if name in ARGUMENTS
        }
        super().__init__(**gemma_backbone_arguments(arguments), dtype=dtype, **kwargs)
        self._set_keras_hub_arguments(arguments)

    def _set_keras_hub_arguments(self, arguments):
        # KerasHub's attributes. This overwrites GemmaBackbone's `intermediate_dim` (twice the
        # feed-forward width) with the width, as KerasHub users read it;
        # `gemma_backbone_config()` doubles it back.
        for name in ARGUMENTS:
            setattr(self, name, arguments[name])
        self.text_only_model = True
        self._saving_as_gemma_backbone = False

    def gemma_backbone_config(self):
        """This model's arguments for `keras_gemma.GemmaBackbone` (our argument names).

        Example:
        >>> GemmaBackbone.from_config(backbone.gemma_backbone_config())   # the same model
        """
        config = GemmaBackbone.get_config(self)
        config["intermediate_dim"] = 2 * self.intermediate_dim
        return config

    @contextlib.contextmanager
    def saving_as_gemma_backbone(self):
        """Within this context `get_config()` answers `gemma_backbone_config()`.

        keras_gemma's preset files store GemmaBackbone arguments, and the preset writer (shared
        with GemmaBackbone and GemmaCausalLM) reads them from `get_config()`.
        """
        self._saving_as_gemma_backbone = True
        try:
            yield self
        finally:
            self._saving_as_gemma_backbone = False

    def get_config(self):
        if getattr(self, "_saving_as_gemma_backbone", False):
            return self.gemma_backbone_config()
        config = {"name": self.name, "trainable": self.trainable}
        config.update({name: getattr(self, name) for name in ARGUMENTS})
        config["dtype"] = GemmaBackbone.get_config(self)["dtype"]
        return config

    def save_to_preset(self, preset_dir):
        """Writes a keras_gemma preset (GemmaBackbone arguments, weights) to `preset_dir`."""
        with self.saving_as_gemma_backbone():
            return super().save_to_preset(preset_dir)

    @classmethod
    def from_gemma_arguments(cls, arguments, resolved=None):
        """A Gemma3Backbone from the GemmaBackbone arguments a preset was read into.

        From a KerasHub preset, its own Gemma3Backbone arguments are kept (so `get_config()`
        gives back its config.json); a KerasHub Gemma 1/2 preset is refused. From other
        formats the arguments are translated, and a model KerasHub's Gemma 3 arguments cannot
        express (a Gemma 1 or 2 checkpoint) is refused by `keras_hub_arguments`.

        Example:
        >>> backbone = Gemma3Backbone.from_preset("gemma3_270m", dtype="float32")
        """
        from keras_gemma.checkpoints.keras_hub import REGISTERED_NAMES

        dtype = arguments.get("dtype")
        if resolved is not None and resolved.kind == "keras_hub":
            family = REGISTERED_NAMES[resolved.config["registered_name"]]
            if family != "gemma3":
                raise ValueError(
                    f"{resolved.path} is a KerasHub {resolved.config['registered_name']} "
                    "preset (Gemma 1 or 2); load it with keras_gemma.GemmaBackbone."
                )
            source = resolved.config.get("config") or {}
            if source.get("vision_encoder") not in (None, {}):
                raise ValueError(f"{resolved.path} is a multimodal Gemma 3. {TEXT_ONLY}")
            keras_hub_config = {**_DEFAULTS, **{k: v for k, v in source.items() if k in ARGUMENTS}}
        else:
            keras_hub_config = keras_hub_arguments(arguments)
        return cls(**keras_hub_config, dtype=dtype)
