"""LoRA and int8 + LoRA ("QLoRA"): training, the adapter file, merging, targets by name.

The quantized LoRA term is checked against numpy on the same factors; merging against the
unmerged model; training by which variables move (and which get optimizer slots).
"""

import keras
import numpy as np
import pytest
from conftest import tiny_config
from conftest import to_numpy

import keras_gemma
from keras_gemma.layers.lora_einsum import GemmaEinsumDense
from keras_gemma.layers.lora_einsum import lora_equations

LORA_NAMES = ("lora_kernel_a", "lora_kernel_b")


def _model(quantize=None, **overrides):
    backbone = keras_gemma.GemmaBackbone(**tiny_config(**overrides))
    lm = keras_gemma.GemmaCausalLM(backbone)
    if quantize:
        lm.quantize(quantize)
    return lm


def _batch(rows=2, length=8):
    rng = np.random.default_rng(0)
    ids = rng.integers(4, 96, size=(rows, length)).astype("int32")
    mask = np.ones((rows, length), "int32")
    mask[1, -2:] = 0
    return {"token_ids": ids, "padding_mask": mask}


def _randomize_lora(backbone, seed=0):
    rng = np.random.default_rng(seed)
    for variable in backbone.weights:
        if variable.name in LORA_NAMES:
            variable.assign(rng.normal(0.0, 0.2, variable.shape).astype("float32"))


@pytest.mark.parametrize(
    "equation, kernel_shape, input_shape",
    [
        ("btd,nhd->btnh", (4, 8, 32), (2, 3, 32)),  # query: (heads, head_dim, hidden)
        ("btnh,dnh->btd", (32, 4, 8), (2, 3, 4, 8)),  # attention output
        ("btf,df->btd", (32, 64), (2, 3, 64)),  # ffw_linear
    ],
)
def test_int8_lora_term_matches_numpy(equation, kernel_shape, input_shape):
    layer = _einsum_layer(equation, input_shape)
    assert tuple(layer.kernel.shape) == kernel_shape
    layer.quantize("int8")
    layer.enable_lora(3, lora_alpha=6)
    x = np.random.default_rng(1).normal(size=input_shape).astype("float32")
    base = to_numpy(layer(x))  # b starts at zero: no LoRA term yet
    a = np.random.default_rng(2).normal(size=layer.lora_kernel_a.shape).astype("float32")
    b = np.random.default_rng(3).normal(size=layer.lora_kernel_b.shape).astype("float32")
    layer.lora_kernel_a.assign(a)
    layer.lora_kernel_b.assign(b)
    expected = np.einsum(equation, x, 2.0 * (a @ b))  # alpha / rank = 2; a @ b is kernel-shaped
    np.testing.assert_allclose(to_numpy(layer(x)) - base, expected, rtol=1e-4, atol=1e-4)


def _einsum_layer(equation, input_shape):
    inputs, rest = equation.split(",")
    kernel, output = rest.split("->")
    sizes = dict(zip(inputs, input_shape))
    sizes.update({"n": 4, "h": 8, "d": 32, "f": 64})
    output_shape = tuple(None if letter == "t" else sizes[letter] for letter in output[1:])
    layer = GemmaEinsumDense(equation, output_shape=output_shape)
    layer.build(input_shape)
    return layer


def test_lora_equations_contract_input_first():
    assert lora_equations("btd,nhd->btnh") == ("btd,rd->btr", "btr,nhr->btnh")
    assert lora_equations("btnh,dnh->btd") == ("btnh,rh->btnr", "btnr,dnr->btd")
    assert lora_equations("btd,dnh->btnh") is None  # (in, out): Keras' own order applies


def test_int8_lora_fit_trains_only_lora():
    lm = _model("int8")
    lm.backbone.enable_lora(rank=4)
    lm.compile(optimizer=keras.optimizers.Adam(learning_rate=1e-2))
    data = _batch()
    labels = np.roll(data["token_ids"], -1, axis=1)
    before = {v.path: to_numpy(v) for v in lm.weights}
    history = lm.fit(data, labels, sample_weight=data["padding_mask"], epochs=3, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < losses[0], losses
    for variable in lm.weights:
        changed = not np.array_equal(before[variable.path], to_numpy(variable))
        assert changed == (variable.name in LORA_NAMES), variable.path
    # Optimizer slots (Adam's two moments) exist for the LoRA factors only.
    lora_size = sum(int(np.prod(v.shape)) for v in lm.trainable_variables)
    assert {v.name for v in lm.trainable_variables} == set(LORA_NAMES)
    slot_size = sum(
        int(np.prod(v.shape)) for v in lm.optimizer.variables if len(v.shape) > 0
    )
    assert slot_size == 2 * lora_size


@pytest.mark.parametrize("suffix", [".safetensors", ".h5"])
def test_adapter_save_load_roundtrip(tmp_path, suffix):
    lm = _model()
    lm.backbone.enable_lora(rank=2)
    _randomize_lora(lm.backbone)
    data = _batch()
    expected = to_numpy(lm(data))
    path = tmp_path / f"adapter{suffix}"
    lm.backbone.save_lora_weights(path)

    other = _model()
    other.backbone.set_weights(_base_weights(lm.backbone))
    other.backbone.enable_lora(rank=2)
    assert not np.allclose(to_numpy(other(data)), expected)
    other.backbone.load_lora_weights(path)
    np.testing.assert_allclose(to_numpy(other(data)), expected, rtol=1e-6, atol=1e-6)

    wrong_rank = _model()
    wrong_rank.backbone.enable_lora(rank=3)
    with pytest.raises(ValueError, match="different LoRA rank"):
        wrong_rank.backbone.load_lora_weights(path)


def _base_weights(backbone):
    return [to_numpy(v) for v in backbone.weights if v.name not in LORA_NAMES]


def test_merge_lora_float_same_logits_and_plain_weights(tmp_path):
    lm = _model()
    lm.backbone.enable_lora(rank=4, target_layer_names=("query", "value", "ffw_linear"))
    _randomize_lora(lm.backbone)
    data = _batch()
    expected = to_numpy(lm(data))
    lm.merge_lora()
    assert not [v for v in lm.weights if v.name in LORA_NAMES]
    np.testing.assert_allclose(to_numpy(lm(data)), expected, rtol=1e-5, atol=1e-5)
    # The merged weights load into a model that never had LoRA.
    lm.save_weights(str(tmp_path / "merged.weights.h5"))
    plain = _model()
    plain.load_weights(str(tmp_path / "merged.weights.h5"))
    np.testing.assert_allclose(to_numpy(plain(data)), expected, rtol=1e-5, atol=1e-5)
    assert len(plain.backbone.trainable_variables) == len(lm.backbone.trainable_variables)


def test_merge_lora_int8_close_to_unmerged():
    lm = _model("int8")
    lm.backbone.enable_lora(rank=4)
    _randomize_lora(lm.backbone)
    data = _batch()
    expected = to_numpy(lm(data))
    lm.merge_lora()
    assert not [v for v in lm.weights if v.name in LORA_NAMES]
    merged = to_numpy(lm(data))
    # Requantizing the merged kernels (int8, one scale per output channel) moves logits a little.
    assert np.abs(merged - expected).max() < 0.05 * np.abs(expected).max()
    with pytest.raises(ValueError, match="no LoRA weights to merge"):
        lm.merge_lora()


def test_enable_lora_targets_by_name():
    lm = _model()
    targets = ("attention_output", "ffw_gating", "ffw_gating_2", "ffw_linear")
    lm.backbone.enable_lora(rank=2, target_layer_names=targets)
    owners = {v.path.split("/")[-2] for v in lm.backbone.trainable_variables}
    assert owners == set(targets)
    assert len(lm.backbone.trainable_variables) == 2 * len(targets) * 2  # 2 layers, a and b
    with pytest.raises(ValueError, match="No layer named"):
        _model().backbone.enable_lora(rank=2, target_layer_names=("q_proj",))


@pytest.mark.parametrize("soft_cap", [None, 3.0])
def test_int8_logits_gradient_is_the_dequantized_products(soft_cap):
    # Keras' int8 reverse call rounds the hidden states: its own gradient is wrong.
    embedding = keras_gemma.GemmaBackbone(
        **tiny_config(final_logit_soft_cap=soft_cap)
    ).token_embedding
    embedding.quantize("int8")
    table = to_numpy(embedding._embeddings).astype("float32")
    table /= to_numpy(embedding.embeddings_scale)[:, None]
    hidden = np.random.default_rng(4).normal(size=(2, 3, 32)).astype("float32")
    upstream = np.random.default_rng(5).normal(size=(2, 3, 96)).astype("float32")
    logits = hidden @ table.T
    if soft_cap is not None:
        upstream = upstream * (1.0 - np.tanh(logits / soft_cap) ** 2)
    expected = upstream @ table
    got = _input_gradient(lambda h: embedding(h, reverse=True), hidden, upstream_seed=5)
    # Keras' forward quantizes the hidden states too: the soft-cap's slope differs a little.
    np.testing.assert_allclose(got, expected, rtol=1e-2, atol=3e-3)


def _input_gradient(function, x, upstream_seed):
    """d sum(function(x) * upstream) / dx on the current backend."""
    backend = keras.backend.backend()
    shape = tuple(to_numpy(function(x)).shape)
    upstream = np.random.default_rng(upstream_seed).normal(size=shape).astype("float32")
    if backend == "jax":
        import jax

        return np.asarray(jax.grad(lambda v: (function(v) * upstream).sum())(x))
    if backend == "torch":
        import torch

        tensor = torch.tensor(x, requires_grad=True)
        (function(tensor) * torch.tensor(upstream)).sum().backward()
        return tensor.grad.numpy()
    import tensorflow as tf

    tensor = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(tensor)
        total = tf.reduce_sum(function(tensor) * upstream)
    return tape.gradient(total, tensor).numpy()


def _trainable_gradients(layer, x, upstream):
    """Training outputs of `layer` and d sum(outputs * upstream) / d its trainable weights."""
    backend = keras.backend.backend()
    variables = layer.trainable_variables
    if backend == "jax":
        import jax

        def total(values):
            outputs, _ = layer.stateless_call(
                values, [v.value for v in layer.non_trainable_variables], x, training=True)
            return (outputs * upstream).sum(), outputs

        (_, outputs), gradients = jax.value_and_grad(total, has_aux=True)(
            [v.value for v in variables])
        return np.asarray(outputs), [np.asarray(g) for g in gradients]
    if backend == "torch":
        outputs = layer(x, training=True)
        (outputs * keras.ops.convert_to_tensor(upstream)).sum().backward()
        return to_numpy(outputs.detach()), [v.value.grad.cpu().numpy() for v in variables]
    import tensorflow as tf

    with tf.GradientTape() as tape:
        outputs = layer(x, training=True)
        total = tf.reduce_sum(outputs * upstream)
    return outputs.numpy(), [g.numpy() for g in tape.gradient(total, variables)]


@pytest.mark.parametrize(
    "equation, input_shape",
    [("btd,nhd->btnh", (2, 3, 32)), ("btnh,dnh->btd", (2, 3, 4, 8)), ("btf,df->btd", (2, 3, 64))],
)
def test_float_lora_training_is_the_merged_kernels_product(equation, input_shape):
    # Training runs the frozen kernel's product plus the low-rank term (no merged kernel):
    # same outputs and factor gradients as the merged kernel's, computed in numpy.
    layer = _einsum_layer(equation, input_shape)
    layer.enable_lora(3, lora_alpha=6)
    rng = np.random.default_rng(7)
    a = rng.normal(size=layer.lora_kernel_a.shape).astype("float32")
    b = rng.normal(size=layer.lora_kernel_b.shape).astype("float32")
    layer.lora_kernel_a.assign(a)
    layer.lora_kernel_b.assign(b)
    kernel = to_numpy(layer._kernel)
    x = rng.normal(size=input_shape).astype("float32")
    outputs, gradients = _trainable_gradients(layer, x, upstream := rng.normal(
        size=np.einsum(equation, x, kernel).shape).astype("float32"))
    np.testing.assert_allclose(outputs, np.einsum(equation, x, kernel + 2.0 * (a @ b)),
                               rtol=1e-4, atol=1e-4)
    # d/d(merged kernel) = einsum of inputs and upstream in the kernel's shape.
    inputs_letters, rest = equation.split(",")
    kernel_letters, output_letters = rest.split("->")
    merged = np.einsum(f"{inputs_letters},{output_letters}->{kernel_letters}", x, upstream)
    expected = {"lora_kernel_a": 2.0 * merged @ b.T,
                "lora_kernel_b": 2.0 * a.reshape(-1, 3).T @ merged.reshape(-1, b.shape[-1])}
    assert [v.name for v in layer.trainable_variables] == ["lora_kernel_a", "lora_kernel_b"]
    for variable, gradient in zip(layer.trainable_variables, gradients):
        np.testing.assert_allclose(gradient, expected[variable.name], rtol=1e-4, atol=1e-3)
