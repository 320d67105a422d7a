"""`backbone.quantize("gptq", config=keras.quantizers.GPTQConfig(...))`: int4 weights
calibrated on text, in keras_gemma's int4 layout (so they decode through the same fast
products, save and load as int4 presets, and take LoRA).

Keras' own GPTQ walks a model's blocks through `get_quantization_layer_structure` and
writes Keras' "gptq" variables. keras_gemma runs its own (layers/gptq.py) and writes plain
int4 variables instead, with a mix measured on the real Gemma 3 270M:

- query, key, attention output and the two FFN gating projections: GPTQ int4 in groups of
  `config.group_size` inputs (32 is what was measured; Keras' default is 128), rounded in
  activation order if `config.activation_order` (recommended; Keras' default is False);
- value and FFN-down projections: int8 (weight-only), as llama.cpp's Q4_K_M keeps them at 6
  to 8 bits: they are the most sensitive to rounding, and the FFN-down Hessian would be the
  largest to hold ([16384, 16384] a layer at 2B);
- every projection of the first and last sixth of the blocks (`int8_edge_blocks`: 3 of the
  270M's 18): int8, as llama.cpp gives its first and last eighths more bits;
- the tied embedding: int8, as `quantize("int4")` does.

Calibration runs the float model once over the calibration tokens (not block by block on
already-quantized inputs): every block's Hessian X^T X / n comes from that one pass, one per
distinct input (query and key share one, the two gating projections another).

Perplexity of the real Gemma 3 270M on tests/gguf_reference.PARAGRAPH (JAX; float32 24.49;
calibration texts that the float model wrote itself from CALIBRATION_PROMPTS, ~1,700-1,900
tokens, `benchmarks/quantization_quality.py`), ratio to float32:

    quantize("int4"): round to nearest, groups of 32                     1.316
    GPTQ, every projection int4, 261 hand-written tokens (12-01)         1.224
    GPTQ, every projection int4, generated text, scale search (12-01)    1.148
    GPTQ, value/FFN-down int8, input order, three texts (12-05)          1.069 - 1.098
    the same in activation order, three texts, top-k 5 (12-06)           1.032 - 1.073
    the same, three texts, top-k 50 (12-06)                              1.033 - 1.058
    and the edge blocks int8 (this recipe), top-k 50 (12-06)             1.007 - 1.020
    the same, top-k 5 (12-06)                                            1.018 - 1.049

Activation order is the largest step: it rounds the inputs that carry the most signal first
(while the most columns remain to take their error) on grids fixed from the weights before
any rounding. The edge blocks hold a third of the int4 candidates; with them in int8 the
figure no longer depends much on the calibration text (a mix measured with simulated
rounding: int4 only in the gating projections of the middle blocks 1.001 - 1.008, which
would leave a third of the int4 this recipe has). Calibration text matters: a few hundred
hand-written tokens are too few, and the model's own samples at top-k 5, which repeat
themselves, came closest to the 5% bound (1.049 once) where top-k 50 samples stayed
under 1.02. Sequential calibration (each block's Hessians from the activations of the blocks
before it, already quantized; Frantar et al.'s order) was no better on average (+3.6%,
+5.9%, +6.3% against +4.7% to +6.5%, 12-01) at 1.3-3x the time, so it is not used. These
float weights are themselves llama.cpp's 4- to 8-bit values (mostly Q5_0), which a second,
coarser grid cannot hold; on weights trained in bfloat16 the figures may differ.

Example:
>>> config = keras.quantizers.GPTQConfig(
...     dataset=["Some text like the text the model will see.", ...],
...     tokenizer=lm.preprocessor.tokenizer, group_size=32, sequence_length=256,
...     activation_order=True)
>>> lm.quantize("gptq", config=config)
"""

import numpy as np
from keras import ops
from keras import quantizers
from keras.src.quantizers.utils import should_quantize_layer

from keras_gemma.collect_once import one_collection
from keras_gemma.layers import gptq
from keras_gemma.layers import int4_kernel

# Per decoder block: the int4 (GPTQ) projections, each with the layer whose inputs it shares.
_INT4_LAYERS = {
    "query": "query",
    "key": "query",
    "attention_output": "attention_output",
    "ffw_gating": "ffw_gating",
    "ffw_gating_2": "ffw_gating",
}
_INT8_LAYERS = ("value", "ffw_linear")


def int8_edge_blocks(num_blocks):
    """How many decoder blocks at each end of the model keep every projection in int8: a
    sixth of them, rounded (3 of the 270M's 18; none of a 2-block test model). The first
    and last blocks are the most sensitive to rounding (llama.cpp gives its first and last
    eighths more bits too); measured on the 270M in the module docstring."""
    return int(round(num_blocks / 6))


def _check_config(config):
    if not isinstance(config, quantizers.GPTQConfig):
        raise ValueError(
            "quantize('gptq') needs `config=keras.quantizers.GPTQConfig(dataset=..., "
            f"tokenizer=...)`; got config={config!r}."
        )
    if config.weight_bits != 4:
        raise ValueError(
            f"keras_gemma's GPTQ writes int4 weights; got GPTQConfig(weight_bits="
            f"{config.weight_bits}). Use weight_bits=4, or quantize('int8') for 8 bits."
        )


def calibration_sequences(dataset, tokenizer, sequence_length, num_samples):
    """Token id rows for calibration: each text tokenized (after `<bos>`) and cut into rows
    of at most `sequence_length` ids; at most `num_samples` rows in all.

    Example:
    >>> rows = calibration_sequences(["One text.", "Another."], tokenizer, 256, 8)
    """
    if isinstance(dataset, (str, bytes)) or not hasattr(dataset, "__iter__"):
        raise ValueError(
            "GPTQConfig's `dataset` must be a list of strings or of token id arrays, got "
            f"{type(dataset).__name__}. Pass e.g. dataset=[text_1, text_2]."
        )
    rows = []
    for item in dataset:
        if isinstance(item, str):
            if tokenizer is None:
                raise ValueError(
                    "GPTQConfig's `dataset` holds strings but `tokenizer` is None; pass "
                    "tokenizer=lm.preprocessor.tokenizer."
                )
            ids = np.asarray(ops.convert_to_numpy(tokenizer.tokenize(item))).reshape(-1)
            start = getattr(tokenizer, "start_token_id", None)
            ids = ids if start is None else np.concatenate([[start], ids])
        else:
            ids = np.asarray(ops.convert_to_numpy(item)).reshape(-1)
        # Rows never span two texts: no attention from one document into another.
        for begin in range(0, len(ids), sequence_length):
            if len(ids) - begin >= 2:
                rows.append(ids[begin:begin + sequence_length].astype("int32"))
    if not rows:
        raise ValueError(
            "GPTQConfig's `dataset` gave no text of 2 tokens or more; pass text for "
            "calibration (a few thousand tokens like the ones the model will see)."
        )
    return rows[:num_samples]


class _HessianObserver:
    """Accumulates X^T X of a layer's inputs, flattened over the contracted axes."""

    def __init__(self, layer):
        lhs, output = layer.equation.split("->")
        inputs, kernel = lhs.split(",")
        contracted = [axis for axis in kernel if axis in inputs and axis not in output]
        self.input_axes = [inputs.index(axis) for axis in contracted]
        # The number of inputs each output sums over: the rows of the Hessian.
        self.input_size = int(np.prod([layer._kernel.shape[kernel.index(axis)]
                                       for axis in contracted]))
        self.sum = 0.0
        self.count = 0
        self.length = None  # tokens of the current row that are not padding

    def __call__(self, inputs):
        x = np.asarray(ops.convert_to_numpy(ops.cast(inputs, "float32")), np.float64)
        x = x[:, :self.length]  # [batch, tokens, ...]: the padding at the end is not data
        kept = [axis for axis in range(x.ndim) if axis not in self.input_axes]
        x = np.transpose(x, kept + self.input_axes)
        x = x.reshape(-1, self.input_size)
        self.sum = self.sum + x.T @ x
        self.count += x.shape[0]

    def hessian(self):
        return self.sum / max(self.count, 1)


def _block_layers(block):
    """{name: GemmaEinsumDense} of one decoder block, by the names above."""
    return {layer.name: layer for layer in block._flatten_layers()
            if hasattr(layer, "equation") and layer.name in _INT4_LAYERS.keys() | set(_INT8_LAYERS)}


def _gptq_layer(layer, hessian, config):
    kernel = np.asarray(ops.convert_to_numpy(layer._kernel), "float32")
    layer.quantize("int4", config=quantizers.Int4QuantizationConfig(block_size=config.group_size))
    order = int4_kernel.contraction_order(layer, kernel.ndim)
    rows = int(np.prod([kernel.shape[axis] for axis in layer._kernel_reduced_axes]))
    flat = np.transpose(kernel, order).reshape(rows, -1)  # [inputs, outputs]
    values, scale, zero = gptq.gptq_int4(
        flat.T, hessian, group_size=config.group_size, symmetric=config.symmetric,
        damping=config.hessian_damping, activation_order=config.activation_order,
    )
    packed, _, _ = quantizers.pack_int4(values.T, axis=-1)
    layer._kernel.assign(packed)
    layer.kernel_scale.assign(scale)
    layer.kernel_zero.assign(zero.astype("int8"))


def quantize_with_gptq(backbone, config, filters=None):
    """Quantizes `backbone` in place as the module docstring says; `filters` as in Keras'
    `Model.quantize` (layers it rejects stay float)."""
    _check_config(config)
    rows = calibration_sequences(
        config.dataset, config.tokenizer, config.sequence_length, config.num_samples
    )
    largest = max(int(row.max()) for row in rows)
    if min(int(row.min()) for row in rows) < 0 or largest >= backbone.vocabulary_size:
        raise ValueError(
            f"GPTQConfig's `dataset` holds token ids outside this model's vocabulary (0 to "
            f"{backbone.vocabulary_size - 1}); tokenize with this model's tokenizer."
        )
    blocks = [_block_layers(block) for block in backbone.transformer_layers]
    for layers in blocks:  # before any layer changes: a refusal leaves the model as it was
        for layer in layers.values():
            if layer.quantization_mode is not None:
                raise ValueError(
                    f"quantize('gptq') needs a float model, but {layer.path} is already "
                    f"{layer.quantization_mode}; load the float weights again and quantize once."
                )
        for name in _INT4_LAYERS.keys() & layers.keys():
            inputs = _HessianObserver(layers[name]).input_size
            if inputs % config.group_size:
                raise ValueError(
                    f"GPTQConfig(group_size={config.group_size}): groups of "
                    f"{config.group_size} inputs do not divide the {inputs} inputs of "
                    f"{layers[name].path}; choose a group_size that divides it (32 or 64 "
                    "for Gemma)."
                )
    edges = int8_edge_blocks(len(blocks))
    int8_blocks = set(range(edges)) | set(range(len(blocks) - edges, len(blocks)))
    observers = {}
    for index, layers in enumerate(blocks):
        if index in int8_blocks:
            continue  # all int8: no Hessian needed
        for name in set(_INT4_LAYERS.values()) & layers.keys():
            observers[index, name] = layers[name]._input_observer = _HessianObserver(layers[name])
    try:
        # Every row padded to one width: eager backends (JAX's above all) compile each op once
        # per shape, and padding at the end changes nothing before it (causal attention).
        width = max(len(row) for row in rows)
        for row in rows:
            ids = np.zeros((1, width), "int32")
            ids[0, :len(row)] = row
            for observer in observers.values():
                observer.length = len(row)
            backbone({"token_ids": ids, "padding_mask": np.arange(width)[None] < len(row)})
    finally:
        for index, name in observers:
            blocks[index][name]._input_observer = None

    with one_collection():
        for index, layers in enumerate(blocks):
            for name, layer in layers.items():
                if not should_quantize_layer(layer, filters):
                    continue
                if name in _INT8_LAYERS or index in int8_blocks:
                    layer.quantize("int8")
                else:
                    hessian = observers[index, _INT4_LAYERS[name]].hessian()
                    _gptq_layer(layer, hessian, config)
            for name in _INT4_LAYERS.values():
                observers.pop((index, name), None)  # the block's Hessians are done with
        if should_quantize_layer(backbone.token_embedding, filters):
            backbone.token_embedding.quantize("int8")
