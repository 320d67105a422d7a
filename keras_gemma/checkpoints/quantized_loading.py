"""Quantizing while loading: a float checkpoint read into an int8 or int4 model layer by layer.

`from_preset(..., quantize="int8")` must never hold the whole model in float (a 2B model is
10 GB in float32 and 2.6 GB in int8). So the backbone is built with a `DTypePolicyMap` that
names each layer `quantize(mode)` would quantize: those layers make their int8/int4
variables directly. Each float weight read from the checkpoint then goes, a block of rows at
a time (~32 MB of float32), through a scratch copy of its layer, which runs the layer's own
`quantize`, and the scratch layer's quantized variables are copied over. The result is the model that
loading in float and calling `quantize(mode)` gives, variable for variable.

Which layers `quantize(mode)` touches, and with which policy, is read off a miniature twin of
the backbone (the same layers and names, tiny widths) quantized the ordinary way, so this
module never restates those rules.

Measured (benchmarks/load_memory.py --int8, gemma_2b_en shape, bfloat16 preset of 5.01 GB,
JAX, 2-core machine): peak RSS 4.7 GB in 97-112 s, against 13.5 GB for KerasHub's load in
bfloat16 then `quantize("int8")`. Of the 4.7 GB: 2.9 GB once the int8 layers are built (2.5 GB
of int8 weights and the runtime), the rest transient while the first weights are quantized.
With blocks of rows written in place (torch, 2026-12-06, same shape, `quantize="int8"`): peak
3.33 GB (was 4.09), 3.09 GB once loaded, 0.48 GB of it the imported runtime.
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


def _output_shape_for_rows(layer, rows):
    """The EinsumDense `output_shape` of `layer` with the kernel's first axis (an output
    axis) `rows` long, for a scratch layer that quantizes a block of the kernel's rows."""
    inputs, rest = layer.equation.replace(" ", "").split(",")
    kernel_axes, outputs = rest.split("->")
    output_shape = list(layer.partial_output_shape)
    # `output_shape` leaves out the output's first (batch) axis.
    position = outputs.index(kernel_axes[0]) - 1
    if kernel_axes[0] in inputs or position < 0:
        raise ValueError(f"{layer.path}: the kernel's first axis of {layer.equation!r} is not "
                         "an output axis; keras_gemma cannot quantize it in blocks of rows.")
    output_shape[position] = rows
    return tuple(output_shape)


def _quantize_config(policy):
    if policy.quantization_mode == "int4":
        block_size = getattr(policy, "block_size", None)
        return keras.quantizers.Int4QuantizationConfig(block_size=block_size)
    return None  # keras_gemma's layers resolve int8's default themselves


# Float32 bytes of weight quantized at a time while loading.
BLOCK_BYTES = 32 << 20


def fill(layer, read_rows, rows, rows_per_chunk=None):
    """Quantizes a float weight (the layer's kernel or embeddings, `rows` long on its first
    axis; `read_rows(start, stop)` gives rows [start, stop) as float32) the way
    `layer.quantize` would have, into `layer`'s quantized variables.

    The weight is quantized a block of rows at a time (`rows_per_chunk`; by default ~32 MB
    of float32): an embedding's scales are per row, and every kernel's first axis is one of
    its outputs (keras_gemma's layout, e.g. `fd` of `btd,fd->btf`), whose scales and int4
    pairs never mix rows. On torch each block is written into the layer's variables in
    place; elsewhere the blocks are gathered in one array per variable, then assigned.
    Measured (gemma_2b_en shape, int8, torch, 2026-12-06): 3.09 GB once loaded; the load
    peaked at 4.09 GB when kernels were quantized whole and the embedding's blocks were
    gathered (the 0.5 GB int8 table held twice, and once more while assigned).
    """
    # Keras collects garbage in each scratch layer's `quantize`; inside a caller's
    # `one_collection` (a whole model's loading) this one does nothing.
    with one_collection():
        _fill(layer, read_rows, rows, rows_per_chunk)


def _fill(layer, read_rows, rows, rows_per_chunk):
    if rows_per_chunk is None:
        row_bytes = read_rows(0, 1).nbytes
        rows_per_chunk = max(2, BLOCK_BYTES // max(row_bytes, 1))
    rows_per_chunk += rows_per_chunk % 2  # int4 packs pairs of rows into one byte
    targets = {variable.name: _RowsTarget(variable) for variable in layer.weights}
    for start in range(0, rows, rows_per_chunk):
        block = read_rows(start, start + rows_per_chunk)
        quantized = _quantize_in_scratch(layer, block, whole=len(block) == rows)
        for name, value in quantized.items():
            targets[name].write(value, layer)
        del block, quantized
    for target in targets.values():
        target.finish()


class _RowsTarget:
    """One quantized variable, written a block of rows at a time: each block is the whole
    variable but for one axis (the rows' axis; scales keep outputs last, int4 packs rows in
    pairs), or equal to the whole when it does not depend on the rows (int4 group indices)."""

    def __init__(self, variable):
        self.variable = variable
        self.shape = tuple(variable.shape)
        self.filled = 0
        self.table = None
        self.in_place = keras.backend.backend() == "torch"

    def write(self, value, layer):
        axes = [i for i, (a, b) in enumerate(zip(self.shape, value.shape)) if a != b]
        if len(axes) > 1 or value.ndim != len(self.shape):
            raise ValueError(
                f"{layer.path}: the quantized {self.variable.name} {value.shape} of a block of "
                f"rows is not a block of the whole {self.shape}; keras_gemma cannot quantize "
                "this layer in blocks."
            )
        index = [slice(None)] * value.ndim
        if axes:
            (axis,) = axes
            index[axis] = slice(self.filled, self.filled + value.shape[axis])
            self.filled += value.shape[axis]
        if self.in_place:
            import torch

            with torch.no_grad():
                # Through Keras: numpy has no bfloat16 of its own (a bfloat16 model's scales).
                self.variable.value[tuple(index)] = keras.ops.convert_to_tensor(value)
            return
        if self.table is None:
            self.table = np.empty(self.shape, dtype=value.dtype)
        self.table[tuple(index)] = value

    def finish(self):
        if self.table is not None:
            self.variable.assign(self.table)
            self.table = None


def _quantize_in_scratch(layer, value, whole=True):
    """`{variable name: numpy value}` of a float copy of `layer` holding `value` (a block of
    the weight's rows where not `whole`) after the layer's own `quantize`."""
    policy = layer_policy(layer)
    config = config_of(layer)  # TensorFlow stays out of a JAX or torch process
    config["dtype"] = keras.dtype_policies.get(policy._source_name)
    config.pop("quantization_config", None)
    is_embedding = isinstance(layer, keras.layers.Embedding)
    if is_embedding:
        config["input_dim"] = value.shape[0]
    elif not whole:
        config["output_shape"] = _output_shape_for_rows(layer, value.shape[0])
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
