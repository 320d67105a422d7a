"""Layout maps that shard Gemma on a `keras.distribution.DeviceMesh`, and a check that they fit.

Keras' own distribution engine does the work (`DeviceMesh`, `LayoutMap`, `ModelParallel`,
`DataParallel`); this module only knows our variable paths and kernel layouts (dense kernels
are stored (out, in)). In Keras 3.15.1 `keras.distribution` exists for the JAX backend only:
TensorFlow and PyTorch have no distribution library there, and this module adds none.

Which axis each variable is sharded on over the model axis, and why
(D hidden, H query heads, K key/value heads, h head_dim, F feed-forward width, V vocabulary):

- `token_embedding/embeddings` (V, D): on V. The lookup then costs one all-reduce of the
  [batch, seq, D] activations and the tied output projection gives logits sharded on V with
  no communication; sharding D instead would all-reduce the [batch, seq, V] logits (V is
  256,000 or 262,144).
- `attention/query|key|value/kernel` (H or K, h, D): column-parallel on the output, but on
  head_dim h, not on the heads: gemma_2b_en, CodeGemma 2B and Gemma 3 270M/1B have ONE
  key/value head (KerasHub shards that axis and fails, keras-hub #1613), and Gemma 3 270M/1B
  have 4 query heads, which an 8-device model axis cannot split. h is 128 or 256 in every
  preset.
- `attention/attention_output/kernel` (D, H, h): row-parallel on its input h, matching the
  query/value sharding, so the attention output is reduced once per layer.
- `ffw_gating/kernel`, `ffw_gating_2/kernel` (F, D): column-parallel on F;
  `ffw_linear/kernel` (D, F): row-parallel on F (Megatron's MLP: one all-reduce per layer).
- Every RMS norm scale (D or h): replicated (a few KB; sharding it would add collectives).
- LoRA factors: `lora_kernel_a` is (kernel.shape[:-1] + (rank,)) and `lora_kernel_b`
  (rank, kernel.shape[-1]); the factor that carries the kernel's sharded axis is sharded on
  it and the other is replicated, so `a @ b` comes out sharded like the kernel, with no
  communication.
- int8 (`quantize("int8")`): each kernel stays int8 under its own path, so its entry above
  applies; its `kernel_scale`, one per output channel, shaped (1, 1) + the kernel's output
  axes, is sharded where the kernel's output is (head_dim for query/key/value, F for the
  gating kernels) and replicated where the kernel is sharded on its input (attention
  output, ffw_linear: their scales are per hidden unit). `embeddings_scale` (V,) is sharded
  on V like the table. Quantizing a sharded kernel then needs no communication but the
  row-parallel kernels' max over their split input axis.
- Nothing is sharded on the data-parallel axis: weights are replicated along it. That keeps
  communication low, above all for LoRA, where frozen weights then never move between
  replicas (KerasHub also shards weights over its data axis, which gathers every weight each
  step). `data_parallel_dim_name` is checked to be a mesh axis.

What head_dim sharding costs, measured by benchmarks/sharding_collectives.py (one decoder
layer's forward pass compiled for 8 simulated CPU devices, mesh (1, 8), batch 2, JAX 0.10):
the attention logits are a sum over h, so each layer adds an all-reduce of
[batch, heads, seq, keys], and RoPE's two halves move once. Collectives per layer, head_dim
against q/k/v sharded on their input D instead: 2B shapes, 512 tokens 46 MB against 36 MB;
7B shapes 85 MB against 88 MB; 4,096 tokens 1.3 GB against 0.29 GB (2B), 2.6 GB against
0.70 GB (7B). The input-D layout, though, computes the whole attention on every device
(per-device FLOPs 1.9x head_dim's at 4,096 tokens for 2B, 1.75x for 7B) and leaves keys and
values (hence a KV cache laid out like them) unsharded. So head_dim: attention compute and
keys/values divided by the model axis, about the same communication at fine-tuning lengths,
more at long ones. Sharding the
query heads (keys/values on h) beats both (28 MB at 2B/512, 0.31 GB at 7B/4,096) but is
possible only when the model axis divides the query heads; with such a model and mesh,
replace the three attention entries (the keys are the patterns in `layout_map(...)`), and
`check_layout` will tell whether the result fits.

Every sharded dimension of every shipped preset divides by 2, 4, ..., 128, so any model axis
of that size fits them all. Keras does not check that a mesh fits: a model axis that does not
divide a sharded dimension makes JAX raise an `IndivisibleError` while the variable is
created, which gives the shape but not the variable. `check_layout` names the variable, its
shape, its layout and the mesh; call it before building under the distribution.

Example:
```python
import keras
from keras_gemma import GemmaBackbone, GemmaCausalLM
from keras_gemma.distribution import check_layout

devices = keras.distribution.list_devices()
mesh = keras.distribution.DeviceMesh((1, 8), ("batch", "model"), devices)
layout_map = GemmaBackbone.get_layout_map(mesh)
check_layout("gemma_7b_en", layout_map)        # raises a ValueError naming what does not fit
keras.distribution.set_distribution(
    keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch"))
lm = GemmaCausalLM.from_preset("gemma_7b_en")
```
"""

import math
import re

import keras

# An optional prefix lets a backbone nested under another name scope match as well.
_BLOCK = r"(?:.+/)?decoder_block_\d+/"

# (regex over variable.path, axes as (None | "model") per dimension). Kept as data so that
# tests can check each entry against every shipped architecture.
_ENTRIES = (
    (r"(?:.+/)?token_embedding/embeddings", ("model", None)),
    (_BLOCK + r"attention/(?:query|key|value)/kernel", (None, "model", None)),
    (_BLOCK + r"attention/attention_output/kernel", (None, None, "model")),
    (_BLOCK + r"ffw_gating(?:_2)?/kernel", ("model", None)),
    (_BLOCK + r"ffw_linear/kernel", (None, "model")),
    (
        r"(?:.+/)?(?:decoder_block_\d+/(?:(?:pre|post)_(?:attention|ffw)_norm"
        r"|attention/(?:query|key)_norm)|final_normalization)/scale",
        (None,),
    ),
    # LoRA: a is kernel.shape[:-1] + (rank,), b is (rank, kernel.shape[-1]).
    (_BLOCK + r"attention/(?:query|key|value)/lora_kernel_a", (None, "model", None)),
    (_BLOCK + r"attention/(?:query|key|value)/lora_kernel_b", (None, None)),
    (_BLOCK + r"attention/attention_output/lora_kernel_a", (None, None, None)),
    (_BLOCK + r"attention/attention_output/lora_kernel_b", (None, "model")),
    (_BLOCK + r"ffw_gating(?:_2)?/lora_kernel_a", ("model", None)),
    (_BLOCK + r"ffw_gating(?:_2)?/lora_kernel_b", (None, None)),
    (_BLOCK + r"ffw_linear/lora_kernel_a", (None, None)),
    (_BLOCK + r"ffw_linear/lora_kernel_b", (None, "model")),
    # int8: a scale per output channel, shaped (1, 1) + the kernel's output axes.
    (r"(?:.+/)?token_embedding/embeddings_scale", ("model",)),
    (_BLOCK + r"attention/(?:query|key|value)/kernel_scale", (None, None, None, "model")),
    (_BLOCK + r"attention/attention_output/kernel_scale", (None, None, None)),
    (_BLOCK + r"ffw_gating(?:_2)?/kernel_scale", (None, None, "model")),
    (_BLOCK + r"ffw_linear/kernel_scale", (None, None, None)),
)

# Every projection `enable_lora` can target (its default is query and value only).
LORA_TARGETS = (
    "query", "key", "value", "attention_output", "ffw_gating", "ffw_gating_2", "ffw_linear"
)


def layout_map(device_mesh, model_parallel_dim_name="model", data_parallel_dim_name="batch"):
    """A `keras.distribution.LayoutMap` for every Gemma variable, sharded over the model axis.

    See this module's docstring for which axis of each variable is sharded and why. Every
    weight of every shipped architecture (LoRA factors included) matches exactly one entry;
    norms are replicated and nothing is sharded along `data_parallel_dim_name`.

    Args:
        device_mesh: a `keras.distribution.DeviceMesh`.
        model_parallel_dim_name: the mesh axis that splits the weights.
        data_parallel_dim_name: the mesh axis that splits the batch (weights are replicated
            along it; pass the same name as `batch_dim_name` to `ModelParallel`).

    Example:
    >>> mesh = keras.distribution.DeviceMesh((2, 4), ("batch", "model"), devices)
    >>> layouts = layout_map(mesh)
    >>> layouts["decoder_block_0/attention/query/kernel"].axes
    (None, 'model', None)
    """
    names = tuple(device_mesh.axis_names)
    for role, name in (("model_parallel_dim_name", model_parallel_dim_name),
                       ("data_parallel_dim_name", data_parallel_dim_name)):
        if name not in names:
            raise ValueError(
                f"{role}={name!r} is not an axis of the device mesh (axes {names}, "
                f"shape {tuple(device_mesh.shape)})."
            )
    layouts = keras.distribution.LayoutMap(device_mesh)
    for pattern, axes in _ENTRIES:
        layouts[pattern] = tuple(model_parallel_dim_name if a == "model" else None for a in axes)
    return layouts


def variable_shapes(config, lora_rank=None, lora_target_layer_names=("query", "value"),
                    quantization_mode=None):
    """`[(path, shape)]` of the weights a `GemmaBackbone(**config)` would have, unbuilt.

    The same paths and shapes, in the same order, as `backbone.weights` (after
    `backbone.enable_lora(lora_rank, lora_target_layer_names)` when `lora_rank` is given, or
    after `quantize("int8")` with `quantization_mode="int8"`), computed without allocating
    anything: a 7B architecture costs a list of tuples.

    Example:
    >>> variable_shapes(GemmaBackbone.presets["gemma_2b_en"]["backbone"])[2]
    ('decoder_block_0/attention/query/kernel', (8, 256, 2048))
    """
    if quantization_mode not in (None, "int8"):
        raise ValueError(f"quantization_mode must be None or 'int8', not {quantization_mode!r}.")
    if quantization_mode and lora_rank:
        raise ValueError("variable_shapes lists LoRA or int8 weights, not both at once.")
    hidden, head_dim = config["hidden_dim"], config["head_dim"]
    heads, kv_heads = config["num_query_heads"], config["num_key_value_heads"]
    width = config["intermediate_dim"] // 2
    int8 = quantization_mode == "int8"

    def dense(prefix, shape, outputs=1):
        # The first `outputs` axes of an (out, in) kernel are its output axes.
        shapes = [(f"{prefix}/kernel", shape)]
        if int8:
            shapes.append((f"{prefix}/kernel_scale", (1, 1) + shape[:outputs]))
        if lora_rank and prefix.rsplit("/", 1)[-1] in lora_target_layer_names:
            shapes.append((f"{prefix}/lora_kernel_a", shape[:-1] + (lora_rank,)))
            shapes.append((f"{prefix}/lora_kernel_b", (lora_rank, shape[-1])))
        return shapes

    shapes = [("token_embedding/embeddings", (config["vocabulary_size"], hidden))]
    if int8:
        shapes.append(("token_embedding/embeddings_scale", (config["vocabulary_size"],)))
    for index in range(config["num_layers"]):
        block = f"decoder_block_{index}"
        shapes.append((f"{block}/pre_attention_norm/scale", (hidden,)))
        shapes += dense(f"{block}/attention/query", (heads, head_dim, hidden), 2)
        shapes += dense(f"{block}/attention/key", (kv_heads, head_dim, hidden), 2)
        shapes += dense(f"{block}/attention/value", (kv_heads, head_dim, hidden), 2)
        shapes += dense(f"{block}/attention/attention_output", (hidden, heads, head_dim))
        if config.get("use_query_key_norm"):
            shapes.append((f"{block}/attention/query_norm/scale", (head_dim,)))
            shapes.append((f"{block}/attention/key_norm/scale", (head_dim,)))
        if config.get("use_post_attention_norm"):
            shapes.append((f"{block}/post_attention_norm/scale", (hidden,)))
        shapes.append((f"{block}/pre_ffw_norm/scale", (hidden,)))
        shapes += dense(f"{block}/ffw_gating", (width, hidden))
        shapes += dense(f"{block}/ffw_gating_2", (width, hidden))
        shapes += dense(f"{block}/ffw_linear", (hidden, width))
        if config.get("use_post_ffw_norm"):
            shapes.append((f"{block}/post_ffw_norm/scale", (hidden,)))
    shapes.append(("final_normalization/scale", (hidden,)))
    return shapes


def _shapes_of(backbone_or_config):
    if isinstance(backbone_or_config, str):
        from keras_gemma.checkpoints.preset_cards import get_card

        return variable_shapes(get_card(backbone_or_config)["backbone"])
    if isinstance(backbone_or_config, dict):
        return variable_shapes(backbone_or_config)
    if isinstance(backbone_or_config, (list, tuple)):
        return backbone_or_config
    model = getattr(backbone_or_config, "backbone", backbone_or_config)  # a CausalLM too
    return [(v.path, tuple(v.shape)) for v in model.weights]


def check_layout(backbone_or_config, layout_map, device_mesh=None):
    """Raises a ValueError unless `layout_map` shards every weight evenly on `device_mesh`.

    Checks, for every weight: that exactly one entry of the map matches its path (a weight
    no entry matches would be silently replicated), that the layout has one axis per
    dimension, that its axes are axes of the mesh, and that each sharded dimension divides
    by the size of its mesh axis. The error names the variable, its shape, its layout and
    the mesh. Call it before building under the distribution: Keras itself checks nothing
    and JAX then fails without naming the variable.

    Args:
        backbone_or_config: a built `GemmaBackbone` (or a causal LM holding one; its current
            weights, LoRA factors included, are checked), `GemmaBackbone` arguments as a
            dict (checked unbuilt, so any size costs nothing), a preset name, or a list of
            `(path, shape)` such as `variable_shapes(config, lora_rank=4)` returns.
        layout_map: a `keras.distribution.LayoutMap`, e.g. `GemmaBackbone.get_layout_map`'s.
        device_mesh: the mesh; defaults to `layout_map.device_mesh`.

    Returns:
        The number of parameters one device holds under this layout.

    Example:
    >>> layouts = GemmaBackbone.get_layout_map(mesh)          # mesh (1, 8)
    >>> check_layout("gemma_7b_en", layouts)                  # fits: per-device count
    1067363328
    >>> check_layout(dict(config, head_dim=12), layouts)
    ValueError: decoder_block_0/attention/query/kernel of shape (16, 12, 3072) is sharded
    (None, 'model', None) on the mesh ...: dimension 1 (12) does not divide by 'model' (8).
    """
    mesh = device_mesh if device_mesh is not None else layout_map.device_mesh
    if mesh is None:
        raise ValueError("check_layout needs a device mesh (the layout map has none).")
    sizes = dict(zip(mesh.axis_names, mesh.shape))
    mesh_text = f"DeviceMesh(shape={tuple(mesh.shape)}, axis_names={tuple(mesh.axis_names)})"
    per_device = 0
    for path, shape in _shapes_of(backbone_or_config):
        shape = tuple(shape)
        matches = [key for key in layout_map if re.fullmatch(key, path)]
        if len(matches) != 1:
            what = "no entry" if not matches else f"several entries {matches}"
            raise ValueError(
                f"{path} of shape {shape} matches {what} of the layout map on {mesh_text}; "
                "each weight must match exactly one (an unmatched one would be replicated "
                "without a word, several make Keras fail)."
            )
        axes = tuple(layout_map[matches[0]].axes)
        if len(axes) != len(shape):
            raise ValueError(
                f"{path} of shape {shape} has the layout {axes} ({len(axes)} axes for "
                f"{len(shape)} dimensions) on {mesh_text}."
            )
        shards = 1
        for dimension, (size, axis) in enumerate(zip(shape, axes)):
            if axis is None:
                continue
            for name in (axis,) if isinstance(axis, str) else tuple(axis):
                if name not in sizes:
                    raise ValueError(
                        f"{path} of shape {shape} is sharded {axes} but {name!r} is not an "
                        f"axis of {mesh_text}."
                    )
            count = math.prod(sizes[n] for n in ((axis,) if isinstance(axis, str) else axis))
            if size % count:
                raise ValueError(
                    f"{path} of shape {shape} is sharded {axes} on {mesh_text}: dimension "
                    f"{dimension} ({size}) does not divide by {axis!r} ({count}). Use a mesh "
                    f"whose {axis!r} axis divides {size}."
                )
            shards *= count
        per_device += math.prod(shape) // shards
    return per_device
