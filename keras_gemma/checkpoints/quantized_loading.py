"""Quantizing while loading: a float checkpoint read into an int8 or int4 model layer by layer.

`from_preset(..., quantize="int8")` must never hold the whole model in float (a 2B model is
10 GB in float32 and 2.6 GB in int8). So the backbone is built with a `DTypePolicyMap` that
names each layer `quantize(mode)` would quantize: those layers make their int8/int4
variables directly. Each float weight read from the checkpoint then goes through a scratch
copy of its layer (one layer in float at a time), which runs the layer's own `quantize`, and
the scratch layer's quantized variables are copied over. The result is the model that
loading in float and calling `quantize(mode)` gives, variable for variable.

Which layers `quantize(mode)` touches, and with which policy, is read off a miniature twin of
the backbone (the same layers and names, tiny widths) quantized the ordinary way, so this
module never restates those rules.

Measured (benchmarks/load_memory.py --int8, gemma_2b_en shape, bfloat16 preset of 5.01 GB,
JAX, 2-core machine): peak RSS 4.7 GB in 97-112 s, against 13.5 GB for KerasHub's load in
bfloat16 then `quantize("int8")`. Of the 4.7 GB: 2.9 GB once the int8 layers are built (2.5 GB
of int8 weights and the runtime), the rest transient while the first weights are quantized.
"""

import keras
import numpy as np

from keras_gemma.config_without_tensorflow import config_of
from keras_gemma.collect_once import one_collection

MODES = ("int8", "int4")

# Widths of the twin: small, even, and compatible with any head layout.
_TWIN_WIDTHS = {"vocabulary_size": 16, "hidden_dim": 16, "intermediate_dim": 16, "head_dim": 4}


def check_mode(mode):
    if mode not in MODES:
        raise ValueError(
            f"quantize={mode!r}: keras_gemma quantizes while loading to one of {MODES} "
            "(or load in float and call `quantize` with a config of your own)."
        )


def quantized_policy_map(cls, arguments, mode):
    """A `DTypePolicyMap` for `cls.from_gemma_arguments(arguments)`: `mode` wherever
    `quantize(mode)` puts it, the float policy of `arguments["dtype"]` everywhere else.

    Example:
    >>> policy_map = quantized_policy_map(GemmaBackbone, arguments, "int8")
    >>> backbone = GemmaBackbone(**{**arguments, "dtype": policy_map})   # int8 kernels, no float
    """
    check_mode(mode)
    base = keras.dtype_policies.get(arguments.get("dtype") or keras.config.dtype_policy())
    if base.quantization_mode is not None:
        raise ValueError(f"quantize={mode!r}: the dtype {base.name!r} is quantized already.")
    twin_arguments = {**arguments, **_TWIN_WIDTHS, "dtype": base}
    twin_arguments["num_query_heads"] = max(1, arguments["num_query_heads"] // max(
        1, arguments["num_key_value_heads"]))
    twin_arguments["num_key_value_heads"] = 1
    # Built outside any keras.distribution: a layout map need not divide the twin's widths.
    distribution = keras.distribution.distribution()
    keras.distribution.set_distribution(None)
    try:
        twin = cls.from_gemma_arguments(twin_arguments)
        twin.quantize(mode)
    finally:
        keras.distribution.set_distribution(distribution)
    policies = {
        layer.path: layer.dtype_policy
        for layer in twin._flatten_layers(include_self=False)
        if layer.quantization_mode is not None
    }
    del twin
    return keras.dtype_policies.DTypePolicyMap(default_policy=base, policy_map=policies)


def layer_policy(layer):
    """The policy that applies to `layer`, also when it was built from a `DTypePolicyMap`."""
    policy = layer.dtype_policy
    if isinstance(policy, keras.dtype_policies.DTypePolicyMap):
        policy = policy[layer.path]
    return policy


def float_weight_name(layer):
    """The name of the float weight a quantized layer was made from ("kernel", "embeddings")."""
    return "embeddings" if isinstance(layer, keras.layers.Embedding) else "kernel"


def quantized_layers(backbone):
    """`{path of the float weight: layer}` for each layer of `backbone` built quantized."""
    layers = {}
    for layer in backbone._flatten_layers(include_self=False):
        if layer.quantization_mode is not None:
            layers[f"{layer.path}/{float_weight_name(layer)}"] = layer
    return layers


def _input_shape(layer, kernel_shape):
    """The input shape that builds an EinsumDense with `kernel_shape`: each input axis the
    kernel also has takes the kernel's size, the others (batch, sequence) are None."""
    inputs, rest = layer.equation.replace(" ", "").split(",")
    kernel_axes = rest.split("->")[0]
    sizes = dict(zip(kernel_axes, kernel_shape))
    return tuple(sizes.get(axis) for axis in inputs)


def _quantize_config(policy):
    if policy.quantization_mode == "int4":
        block_size = getattr(policy, "block_size", None)
        return keras.quantizers.Int4QuantizationConfig(block_size=block_size)
    return None  # keras_gemma's layers resolve int8's default themselves


def fill(layer, read_rows, rows, rows_per_chunk=4096):
    """Quantizes a float weight (the layer's kernel or embeddings, `rows` long on its first
    axis; `read_rows(start, stop)` gives rows [start, stop) as float32) the way
    `layer.quantize` would have, into `layer`'s quantized variables.

    An embedding is quantized a block of rows at a time (its scales are per row, so the
    blocks are independent): the 2B model's table is 2.1 GB in float32, and quantizing it
    whole takes several float32 temporaries of that size.
    """
    # Keras collects garbage in each scratch layer's `quantize`; inside a caller's
    # `one_collection` (a whole model's loading) this one does nothing.
    with one_collection():
        _fill(layer, read_rows, rows, rows_per_chunk)


def _fill(layer, read_rows, rows, rows_per_chunk):
    if not isinstance(layer, keras.layers.Embedding):
        quantized = _quantize_in_scratch(layer, read_rows(0, rows))
        for variable in layer.weights:
            variable.assign(quantized[variable.name])
        return
    tables = {}  # each quantized variable, filled block by block
    for start in range(0, rows, rows_per_chunk):
        block = read_rows(start, start + rows_per_chunk)
        for name, value in _quantize_in_scratch(layer, block).items():
            if value.shape[:1] != block.shape[:1]:
                raise ValueError(
                    f"{layer.path}: the quantized {name} is not one row per vocabulary entry "
                    f"({value.shape}); keras_gemma cannot quantize this embedding in blocks."
                )
            if name not in tables:
                tables[name] = np.empty((rows,) + value.shape[1:], dtype=value.dtype)
            tables[name][start : start + len(value)] = value
        del block
    for variable in layer.weights:
        variable.assign(tables.pop(variable.name))


def _quantize_in_scratch(layer, value):
    """`{variable name: numpy value}` of a float copy of `layer` holding `value` (an embedding
    may get fewer rows than the layer has) after the layer's own `quantize`."""
    policy = layer_policy(layer)
    config = config_of(layer)  # TensorFlow stays out of a JAX or torch process
    config["dtype"] = keras.dtype_policies.get(policy._source_name)
    config.pop("quantization_config", None)
    is_embedding = isinstance(layer, keras.layers.Embedding)
    if is_embedding:
        config["input_dim"] = value.shape[0]
    scratch = layer.__class__.from_config(config)
    if is_embedding:
        scratch.build()
        target = scratch.embeddings
    else:
        scratch.build(_input_shape(layer, value.shape))
        target = scratch._kernel
    if tuple(target.shape) != tuple(value.shape):
        raise ValueError(
            f"{layer.path}: the checkpoint's {float_weight_name(layer)} has shape "
            f"{tuple(value.shape)}, the model expects {tuple(target.shape)}."
        )
    target.assign(value)
    scratch.quantize(policy.quantization_mode, config=_quantize_config(policy))
    quantized = {variable.name: keras.ops.convert_to_numpy(variable) for variable in scratch.weights}
    missing = sorted({variable.name for variable in layer.weights} - set(quantized))
    if missing:
        raise ValueError(f"{layer.path}: quantizing made no {missing} (it made {sorted(quantized)}).")
    return quantized
