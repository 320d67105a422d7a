"""float32 training products through oneDNN on torch: the numbers of numpy's float32 products,
forward and backward, in the layers' training calls and in a whole training step."""

import keras
import numpy as np
import pytest
from conftest import BACKEND, tiny_config

import keras_gemma
from keras_gemma.layers import torch_onednn_product as onednn
from keras_gemma.layers.lora_einsum import GemmaEinsumDense
from keras_gemma.layers.tied_embedding import GemmaReversibleEmbedding

pytestmark = pytest.mark.skipif(BACKEND != "torch", reason="torch's oneDNN operator")


@pytest.fixture
def forced(monkeypatch):
    monkeypatch.setenv("KERAS_GEMMA_TORCH_ONEDNN", "1")
    if not onednn.torch_product_choice.onednn_float32_is_faster():
        pytest.skip("this torch build has no oneDNN linear operator")


def _tensor(shape, seed, column_major=False):
    import torch

    values = np.random.default_rng(seed).normal(size=shape).astype("float32")
    tensor = torch.tensor(values)
    if column_major:  # as decode_matmul.lay_out_for_decode stores wide kernels
        tensor = tensor.T.contiguous().T if tensor.dim() == 2 else tensor
    return tensor.requires_grad_()


@pytest.mark.parametrize(
    "equation, inputs_shape, kernel_shape",
    [
        ("btd,fd->btf", (2, 5, 8), (24, 8)),
        ("btd,nhd->btnh", (2, 5, 8), (3, 4, 8)),
        ("btnh,dnh->btd", (2, 5, 3, 4), (8, 3, 4)),
    ],
)
@pytest.mark.parametrize("column_major", [False, True])
def test_einsum_values_and_both_gradients(forced, equation, inputs_shape, kernel_shape,
                                          column_major):
    inputs = _tensor(inputs_shape, 0)
    kernel = _tensor(kernel_shape, 1, column_major=column_major)
    output = onednn.einsum(equation, inputs, kernel)
    upstream = np.random.default_rng(2).normal(size=tuple(output.shape)).astype("float32")
    (output * keras.ops.convert_to_tensor(upstream)).sum().backward()

    x, w = inputs.detach().numpy(), kernel.detach().numpy()
    expected = np.einsum(equation, x, w)
    sides, result = equation.split("->")
    x_axes, w_axes = sides.split(",")
    np.testing.assert_allclose(output.detach().numpy(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        inputs.grad.numpy(), np.einsum(f"{result},{w_axes}->{x_axes}", upstream, w),
        rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        kernel.grad.numpy(), np.einsum(f"{x_axes},{result}->{w_axes}", x, upstream),
        rtol=1e-5, atol=1e-5)


def test_layers_use_it_in_training_and_for_several_rows(forced, monkeypatch):
    """Training products and inference products of several rows (a prefill) go through
    oneDNN; one row (what a decode step would multiply) keeps the layer's own call."""
    calls = []
    original = onednn.linear
    monkeypatch.setattr(onednn, "linear", lambda *args: calls.append(1) or original(*args))
    dense = GemmaEinsumDense("btd,fd->btf", output_shape=(None, 24))
    dense.build((None, None, 8))
    embedding = GemmaReversibleEmbedding(40, 8, tie_weights=True)
    embedding.build((None,))
    row = keras.ops.ones((1, 1, 8))
    dense(row, training=False)
    embedding(row, reverse=True)
    assert calls == []
    hidden = keras.ops.ones((1, 3, 8))
    dense(hidden, training=False)
    embedding(hidden, reverse=True)
    assert len(calls) == 2
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(dense(hidden, training=False)),
        np.ones((1, 3, 8)) @ keras.ops.convert_to_numpy(dense.kernel).T, rtol=1e-5, atol=1e-5)
    calls.clear()
    trained = dense(hidden, training=True)
    logits = embedding(hidden, reverse=True, training=True)
    assert len(calls) == 2
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(trained),
        keras.ops.convert_to_numpy(dense(hidden, training=False)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(logits),
        keras.ops.convert_to_numpy(embedding(hidden, reverse=True)), rtol=1e-5, atol=1e-5)


def test_training_steps_equal_the_default_products(forced, monkeypatch):
    def trained(setting):
        monkeypatch.setenv("KERAS_GEMMA_TORCH_ONEDNN", setting)
        keras.utils.set_random_seed(3)
        backbone = keras_gemma.GemmaBackbone(**tiny_config(vocabulary_size=160))
        model = keras_gemma.GemmaCausalLM(backbone, compile=False)
        model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.1),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        ids = np.random.default_rng(0).integers(1, 160, size=(2, 9)).astype("int32")
        x = {"token_ids": ids[:, :-1], "padding_mask": np.ones((2, 8), "int32")}
        losses = [model.train_on_batch(x, ids[:, 1:]) for _ in range(3)]
        return losses, [keras.ops.convert_to_numpy(v) for v in model.trainable_variables]

    losses, weights = trained("1")
    reference_losses, reference_weights = trained("0")
    np.testing.assert_allclose(losses, reference_losses, rtol=1e-5)
    for ours, reference in zip(weights, reference_weights):
        np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-6)


def test_the_setting_decides(monkeypatch):
    monkeypatch.setenv("KERAS_GEMMA_TORCH_ONEDNN", "0")
    assert not onednn.torch_product_choice.onednn_float32_is_faster()
    kernel = keras.ops.ones((4, 3))
    assert not onednn.runs_here(keras.ops.ones((2, 3)), kernel, training=True)
    assert not onednn.runs_here(keras.ops.ones((2, 3)), kernel, training=False)
    monkeypatch.setenv("KERAS_GEMMA_TORCH_ONEDNN", "1")
    assert not onednn.runs_here(keras.ops.ones((1, 3)), kernel, training=False)  # one row
    assert onednn.runs_here(keras.ops.ones((2, 3)), kernel, training=False) == (
        keras.backend.backend() == "torch" and onednn.torch_product_choice.onednn_available())
    monkeypatch.setenv("KERAS_GEMMA_TORCH_NATIVE_16BIT", "0")
    assert not onednn.runs_here(
        keras.ops.ones((2, 3), "bfloat16"), keras.ops.ones((4, 3), "bfloat16"), training=True)
    assert not onednn.runs_here(  # mixed dtypes keep Keras' call
        keras.ops.ones((2, 3), "bfloat16"), kernel, training=True)


def test_bfloat16_where_the_cpu_multiplies_it_fast(monkeypatch):
    import torch

    monkeypatch.setenv("KERAS_GEMMA_TORCH_NATIVE_16BIT", "1")
    if not onednn.torch_product_choice.onednn_available():
        pytest.skip("this torch build has no oneDNN linear operator")
    inputs = _tensor((2, 5, 8), 0).detach().to(torch.bfloat16).requires_grad_()
    kernel = _tensor((24, 8), 1).detach().to(torch.bfloat16).requires_grad_()
    assert onednn.runs_here(inputs, kernel, training=True)
    output = onednn.einsum("btd,fd->btf", inputs, kernel)
    assert output.dtype == torch.bfloat16
    output.float().sum().backward()
    x, w = inputs.detach().float().numpy(), kernel.detach().float().numpy()
    # One bfloat16 rounding of results accumulated in float32.
    np.testing.assert_allclose(output.detach().float().numpy(), x @ w.T, rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(
        inputs.grad.float().numpy(), np.ones((2, 5, 24), "float32") @ w, rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(
        kernel.grad.float().numpy(), np.ones((24, 10), "float32") @ x.reshape(10, 8),
        rtol=2e-2, atol=5e-2)
    monkeypatch.setenv("KERAS_GEMMA_TORCH_NATIVE_16BIT", "0")
    assert not onednn.runs_here(inputs, kernel, training=True)


@pytest.mark.parametrize("equation, inputs_shape, kernel_shape", [
    ("btd,fd->btf", (2, 5, 8), (24, 8)),
    ("btnh,dnh->btd", (2, 5, 3, 4), (8, 3, 4)),
])
def test_input_gradient_outside_autograd(forced, equation, inputs_shape, kernel_shape):
    kernel = _tensor(kernel_shape, 1).detach()
    sides, result = equation.split("->")
    inputs_axes, kernel_axes = sides.split(",")
    output_shape = tuple(np.einsum(equation, np.zeros(inputs_shape), np.zeros(kernel_shape)).shape)
    gradient = _tensor(output_shape, 2).detach()
    actual = onednn.einsum_input_gradient(equation, gradient, kernel)
    expected = np.einsum(f"{result},{kernel_axes}->{inputs_axes}", gradient.numpy(), kernel.numpy())
    np.testing.assert_allclose(actual.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_a_frozen_weight_keeps_no_inputs_for_backward(forced):
    import torch

    inputs = _tensor((3, 8), 0)
    frozen = torch.ones(5, 8)
    output = onednn.linear(inputs, frozen)
    assert output.grad_fn.saved_tensors[0] is None
    output.sum().backward()
    np.testing.assert_allclose(inputs.grad.numpy(), np.full((3, 8), 5.0, "float32"))
    trained = onednn.linear(inputs, frozen.clone().requires_grad_())
    assert trained.grad_fn.saved_tensors[0] is inputs


def test_jit_compiled_training_steps_run(forced):
    # torch.compile (Keras' jit_compile=True) traces the layers: Inductor gets plain products.
    keras.utils.set_random_seed(5)
    backbone = keras_gemma.GemmaBackbone(**tiny_config(vocabulary_size=160))
    model = keras_gemma.GemmaCausalLM(backbone, compile=False)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.5),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=True)
    ids = np.random.default_rng(0).integers(1, 160, size=(2, 9)).astype("int32")
    x = {"token_ids": ids[:, :-1], "padding_mask": np.ones((2, 8), "int32")}
    losses = [float(model.train_on_batch(x, ids[:, 1:], return_dict=True)["loss"]) for _ in range(3)]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
