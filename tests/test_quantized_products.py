"""int8 and int4 products against numpy on the same quantized variables, on every backend.

The references read the layer's variables back (int8 values and scales; int4 nibbles,
scales and zero points) and rebuild each kernel in numpy by the layout the layers document
(keras_gemma/layers/int4_kernel.py for int4 kernels stored (out, in); Keras' own for int8
and the embedding), then multiply in float64: equal within float32 rounding on JAX and
TensorFlow. On torch the products run through PyTorch's packed CPU kernels
(layers/quantized_products.py), which take bfloat16 activations and return bfloat16: the
reference rounds the inputs to bfloat16 too, and the tolerance is bfloat16's (the output's
rounding and the kernel's bfloat16 scales, 2^-8 relative each). A second check ties the layout to the float kernel: each dequantized weight lies
within half a quantization step of the weight it came from.
"""

import gc

import keras
import numpy as np
import pytest
from conftest import BACKEND
from conftest import tiny_config
from conftest import to_numpy

import keras_gemma
from keras_gemma.layers.lora_einsum import GemmaEinsumDense
from keras_gemma.layers.tied_embedding import GemmaReversibleEmbedding

INT4 = keras.quantizers.Int4QuantizationConfig(block_size=32)
INT4_PER_CHANNEL = keras.quantizers.Int4QuantizationConfig(block_size=None)
MODES = {"int8": ("int8", None), "int4": ("int4", INT4), "int4_per_channel": ("int4", INT4_PER_CHANNEL)}

# (equation, output shape, input shape): every projection of a decoder block, kernels (out, in).
EQUATIONS = [
    ("btd,nhd->btnh", (None, 4, 16), (2, 3, 64)),  # query
    ("btd,khd->btkh", (None, 1, 16), (2, 3, 64)),  # key / value
    ("btnh,dnh->btd", (None, 64), (2, 3, 4, 16)),  # attention output
    ("btd,fd->btf", (None, 96), (2, 3, 64)),  # FFN gate / up
    ("btf,df->btd", (None, 64), (2, 3, 96)),  # FFN down
]


def _unpack_nibbles(packed):
    """int8 bytes [..., m] -> int values in [-8, 7], [..., 2m]: low nibble first."""
    as_bytes = np.asarray(packed).astype(np.uint8)
    low, high = (as_bytes & 0x0F).astype(np.int64), (as_bytes >> 4).astype(np.int64)
    values = np.stack([low, high], axis=-1).reshape(*as_bytes.shape[:-1], -1)
    return np.where(values >= 8, values - 16, values)


def _dense_kernel(layer, mode):
    """The float64 kernel [outputs..., inputs...] the layer's quantized variables hold."""
    shape = tuple(layer.original_kernel_shape if mode != "int8" else layer._kernel.shape)
    inputs, rest = layer.equation.split(",")
    outputs = sum(1 for letter in rest.split("->")[0] if letter not in inputs)
    n, k = int(np.prod(shape[:outputs])), int(np.prod(shape[outputs:]))
    if mode == "int8":
        scale = to_numpy(layer.kernel_scale).astype(np.float64).reshape(n, 1)
        return (to_numpy(layer._kernel).astype(np.float64).reshape(n, k) / scale).reshape(shape)
    flat = _unpack_nibbles(to_numpy(layer._kernel))[:, :n].astype(np.float64)  # [K, N]
    scale = to_numpy(layer.kernel_scale).astype(np.float64)
    if mode == "int4_per_channel":
        flat = flat / scale[None, :]
    else:
        groups = np.arange(k) // 32
        flat = (flat - to_numpy(layer.kernel_zero)[groups]) * scale[groups]
    return flat.T.reshape(shape)


def _quantize(layer, mode):
    name, config = MODES[mode]
    layer.quantize(name, config=config)


def _close(got, expected, packed_kernels=False):
    tolerance = 1e-2 if packed_kernels and BACKEND == "torch" else 2e-5
    np.testing.assert_allclose(got, expected, rtol=tolerance,
                               atol=tolerance * np.abs(expected).max())


def _kernel_inputs(x):
    """`x` as the products read it: rounded to bfloat16 for torch's packed kernels."""
    if BACKEND != "torch":
        return x.astype(np.float64)
    bits = np.asarray(x, np.float32).view(np.uint32)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000  # round half to even
    return rounded.astype(np.uint32).view(np.float32).astype(np.float64)


def _check_step(original, dequantized, mode):
    # Half a step: int8 per output channel (max |w| / 127), int4 groups of 32 along the
    # inputs ((max - min) / 15, or max |w| / 7.5 per channel). A layout that mixed inputs
    # with outputs would group weights of other channels and miss these bounds.
    error = np.abs(dequantized - original)
    levels = {"int8": 127.0, "int4": 7.5, "int4_per_channel": 7.5}[mode]
    assert error.max() <= 1.01 * np.abs(original).max() / levels, error.max()


def _used_torch_kernels(layer):
    return bool(layer.__dict__.get("_prepared_products"))


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("equation, output_shape, input_shape", EQUATIONS)
def test_dense_products_match_numpy(equation, output_shape, input_shape, mode):
    layer = GemmaEinsumDense(equation, output_shape=output_shape)
    layer.build((None, None) + input_shape[2:])
    original = to_numpy(layer.kernel).astype(np.float64)
    _quantize(layer, mode)
    assert layer.quantization_mode == MODES[mode][0]
    kernel = _dense_kernel(layer, mode)
    _check_step(original, kernel, mode)
    x = np.random.default_rng(1).normal(size=input_shape).astype("float32")
    _close(to_numpy(layer(x)), np.einsum(equation, _kernel_inputs(x), kernel), True)
    assert _used_torch_kernels(layer) == (BACKEND == "torch")


@pytest.mark.parametrize("rows", [1, 3])
def test_int8_inputs_not_a_multiple_of_16_keep_the_float_product(rows):
    # torch's int8 kernel crashed (several rows) or returned garbage (one row) here.
    layer = GemmaEinsumDense("btd,fd->btf", output_shape=(None, 32))
    layer.build((None, None, 24))
    _quantize(layer, "int8")
    kernel = _dense_kernel(layer, "int8")
    x = np.random.default_rng(3).normal(size=(1, rows, 24)).astype("float32")
    _close(to_numpy(layer(x)), np.einsum("btd,fd->btf", x, kernel))
    assert not _used_torch_kernels(layer)
    embedding = GemmaReversibleEmbedding(37, 8, tie_weights=True)
    embedding.build((None,))
    _quantize(embedding, "int8")
    table = to_numpy(embedding._embeddings).astype(np.float64) / to_numpy(
        embedding.embeddings_scale).astype(np.float64)[:, None]
    hidden = np.random.default_rng(4).normal(size=(1, rows, 8)).astype("float32")
    _close(to_numpy(embedding(hidden, reverse=True)), hidden @ table.T)
    assert not _used_torch_kernels(embedding)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_tied_embedding_lookup_and_logits_match_numpy(mode):
    embedding = GemmaReversibleEmbedding(96, 64, tie_weights=True, logit_soft_cap=30.0)
    embedding.build((None,))
    original = to_numpy(embedding.embeddings).astype(np.float64)
    _quantize(embedding, mode)
    scale = to_numpy(embedding.embeddings_scale).astype(np.float64)
    if mode == "int8":
        table = to_numpy(embedding._embeddings).astype(np.float64) / scale[:, None]
    else:
        values = _unpack_nibbles(to_numpy(embedding._embeddings))[:, :64].astype(np.float64)
        if mode == "int4_per_channel":
            table = values / scale[:, None]
        else:
            groups = np.arange(64) // 32
            table = (values - to_numpy(embedding.embeddings_zero)[:, groups]) * scale[:, groups]
    _check_step(original, table, mode)
    ids = np.array([[5, 0, 95], [17, 17, 3]], "int32")
    _close(to_numpy(embedding(ids)), table[ids])
    hidden = np.random.default_rng(2).normal(size=(2, 3, 64)).astype("float32")
    expected = 30.0 * np.tanh(_kernel_inputs(hidden) @ table.T / 30.0)
    _close(to_numpy(embedding(hidden, reverse=True)), expected, True)
    assert _used_torch_kernels(embedding) == (BACKEND == "torch")


def test_keras_default_configs_mean_keras_gemmas_defaults():
    # quantize("int4"): groups of 32 in the dense layers, the tied embedding in int8.
    lm = _tiny_lm()
    gc.freeze()
    try:
        lm.quantize("int4")
    finally:
        gc.unfreeze()
    embedding = lm.backbone.token_embedding
    assert embedding.quantization_mode == "int8" and embedding.inputs_quantizer is None
    dense = lm.backbone.transformer_layers[0].gating_ffw
    assert dense.quantization_mode == "int4" and dense._int4_block_size == 32
    # quantize("int8"): weight-only; an explicit activation quantizer is kept.
    layer = GemmaEinsumDense("btd,fd->btf", output_shape=(None, 16))
    layer.build((None, None, 32))
    layer.quantize("int8")
    assert layer.inputs_quantizer is None
    explicit = GemmaEinsumDense("btd,fd->btf", output_shape=(None, 16))
    explicit.build((None, None, 32))
    quantizer = keras.quantizers.AbsMaxQuantizer(axis=-1)
    config = keras.quantizers.Int8QuantizationConfig(activation_quantizer=quantizer)
    explicit.quantize("int8", config=config)
    assert explicit.inputs_quantizer is quantizer


def _tiny_lm():
    backbone = keras_gemma.GemmaBackbone(**tiny_config(), dtype="float32")
    rng = np.random.default_rng(0)
    for variable in backbone.weights:
        variable.assign(rng.normal(0, 0.3, variable.shape).astype("float32"))
    return keras_gemma.GemmaCausalLM(backbone)


def _quantize_model(lm, mode):
    # Keras runs gc.collect() once per quantized layer (~1 s each in a test process full of
    # objects); freezing them first keeps this fast.
    gc.freeze()
    try:
        name, config = MODES[mode]
        lm.quantize(name, config=config)
    finally:
        gc.unfreeze()


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_greedy_generate_is_the_argmax_of_its_own_logits(mode):
    lm = _tiny_lm()
    _quantize_model(lm, mode)
    assert lm.backbone.token_embedding.quantization_mode == MODES[mode][0]
    ids = np.zeros((2, 10), "int32")
    ids[:, :3] = [[2, 40, 41], [2, 7, 8]]
    prompt = {"token_ids": ids, "padding_mask": np.arange(10)[None, :] < 3}
    lm.compile(sampler="greedy")
    out = to_numpy(lm.generate(prompt, stop_token_ids=None)["token_ids"])
    # Each generated token is the argmax of the quantized model's full forward pass over
    # the tokens before it (the decode step and the cache against a plain forward pass),
    # up to a near-tie within the products' rounding (bfloat16 on torch: one row or many
    # round differently, and a random tiny model amplifies it; seen: 1.1% of the largest
    # logit after two int4 blocks; JAX's int4 steps read their kernels in bfloat16:
    # int4_decode_kernels.py).
    logits = to_numpy(lm({"token_ids": out, "padding_mask": np.ones_like(out)}))[:, 2:-1]
    chosen = np.take_along_axis(logits, out[:, 3:, None], axis=-1)[..., 0]
    sixteen_bit = BACKEND == "torch" or (BACKEND == "jax" and mode == "int4")
    tolerance = (3e-2 if sixteen_bit else 1e-5) * np.abs(logits).max()
    assert (chosen >= logits.max(-1) - tolerance).all(), (out, logits.argmax(-1))


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_lora_on_a_quantized_model_trains(mode):
    lm = _tiny_lm()
    _quantize_model(lm, mode)
    lm.backbone.enable_lora(rank=2)
    lm.compile(optimizer=keras.optimizers.Adam(learning_rate=1e-2))
    rng = np.random.default_rng(3)
    data = {"token_ids": rng.integers(4, 96, size=(2, 8)).astype("int32"),
            "padding_mask": np.ones((2, 8), "int32")}
    labels = np.roll(data["token_ids"], -1, axis=1)
    frozen = {v.path: to_numpy(v) for v in lm.weights if "lora" not in v.name}
    history = lm.fit(data, labels, epochs=3, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < losses[0], losses
    for variable in lm.weights:
        if variable.path in frozen:
            np.testing.assert_array_equal(to_numpy(variable), frozen[variable.path])
