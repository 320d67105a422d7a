"""Training 16-bit layers on torch on a CPU: products in float32 arithmetic give the numbers
of numpy's float32 products of the same 16-bit values (rounded once to the 16-bit dtype),
forward and backward, in the layers' training calls."""

import numpy as np
import pytest
from conftest import BACKEND

from keras_gemma.layers import torch_sixteen_bit_training as sixteen
from keras_gemma.layers.lora_einsum import GemmaEinsumDense
from keras_gemma.layers.tied_embedding import GemmaReversibleEmbedding

pytestmark = pytest.mark.skipif(BACKEND != "torch", reason="torch's autograd")

BFLOAT16_STEP = 2.0 ** -7  # relative spacing of bfloat16 values


def _bfloat16(shape, seed):
    import torch

    values = np.random.default_rng(seed).normal(size=shape).astype("float32")
    return torch.tensor(values).to(torch.bfloat16)


def _numpy(tensor):
    return tensor.detach().float().numpy()


def _close(actual, expected):
    # One bfloat16 rounding of the result (the arithmetic is float32 on both sides).
    scale = np.abs(expected).max()
    np.testing.assert_allclose(_numpy(actual), expected, rtol=0, atol=BFLOAT16_STEP * scale)


def test_kernel_gradient_equation():
    assert sixteen.kernel_gradient_equation("btnh,dnh->btd") == "btnh,btd->dnh"


@pytest.mark.parametrize("equation", ["btd,fd->btf", "btnh,dnh->btd"])
def test_float32_einsum_values_and_both_gradients(equation):
    inputs_shape = (2, 3, 8) if equation.startswith("btd") else (2, 3, 2, 4)
    kernel_shape = (6, 8) if equation.startswith("btd") else (5, 2, 4)
    x = _bfloat16(inputs_shape, 0).requires_grad_()
    w = _bfloat16(kernel_shape, 1).requires_grad_()
    out = sixteen.float32_einsum(equation, x, w)
    assert out.dtype == x.dtype
    _close(out, np.einsum(equation, _numpy(x), _numpy(w)))
    gradient = _bfloat16(tuple(out.shape), 2)
    out.backward(gradient)
    inputs, rest = equation.split(",")
    kernel, output = rest.split("->")
    g = _numpy(gradient)
    _close(x.grad, np.einsum(f"{output},{kernel}->{inputs}", g, _numpy(w)))
    _close(w.grad, np.einsum(f"{inputs},{output}->{kernel}", _numpy(x), g))


def test_float32_logits_in_blocks_values_and_both_gradients():
    hidden = _bfloat16((2, 3, 8), 3).requires_grad_()
    table = _bfloat16((10, 8), 4).requires_grad_()
    logits = sixteen.float32_logits(hidden, table, rows=4)  # blocks of 4, 4 and 2 rows
    _close(logits, _numpy(hidden) @ _numpy(table).T)
    gradient = _bfloat16((2, 3, 10), 5)
    logits.backward(gradient)
    g = _numpy(gradient)
    _close(hidden.grad, g @ _numpy(table))
    _close(table.grad, g.reshape(-1, 10).T @ _numpy(hidden).reshape(-1, 8))


def test_bfloat16_lora_layer_trains_through_float32_arithmetic(monkeypatch):
    import torch

    monkeypatch.setenv("KERAS_GEMMA_TORCH_NATIVE_16BIT", "0")  # a CPU without fast bfloat16

    layer = GemmaEinsumDense("btd,fd->btf", output_shape=(None, 6), dtype="bfloat16")
    layer.build((1, 3, 8))
    layer.enable_lora(2)
    layer.lora_kernel_b.assign(np.full(layer.lora_kernel_b.shape, 0.1, "float32"))
    # Inputs that need a gradient, as inside a model (LoRA factors upstream).
    x = _bfloat16((1, 3, 8), 6).requires_grad_()
    with torch.enable_grad():
        out = layer(x, training=True)
        # The frozen kernel's product (LoRA trains as kernel product + low-rank term).
        assert "Float32Einsum" in _autograd_node_names(out)
        out.float().sum().backward()
    kernel = _numpy(layer.kernel)  # the base kernel plus the LoRA term, in bfloat16
    _close(out, np.einsum("btd,fd->btf", _numpy(x), kernel))
    assert layer.lora_kernel_a.value.grad is not None
    # Inference keeps Keras' own product.
    assert "Float32Einsum" not in _autograd_node_names(layer(x, training=False))


def _autograd_node_names(tensor):
    """The class names of every node in `tensor`'s autograd graph, joined."""
    names, pending, seen = [], [tensor.grad_fn], set()
    while pending:
        node = pending.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        names.append(type(node).__name__)
        pending.extend(next_node for next_node, _ in node.next_functions)
    return " ".join(names)


def test_bfloat16_tied_logits_train_through_float32_arithmetic(monkeypatch):
    import torch

    monkeypatch.setenv("KERAS_GEMMA_TORCH_NATIVE_16BIT", "0")

    embedding = GemmaReversibleEmbedding(10, 8, logit_soft_cap=5.0, dtype="bfloat16")
    embedding.build((1, 3))
    hidden = _bfloat16((1, 3, 8), 7).requires_grad_()
    with torch.enable_grad():
        logits = embedding(hidden, reverse=True, training=True)
        logits.float().sum().backward()
    table = _numpy(embedding.embeddings.value)
    _close(logits, 5.0 * np.tanh(_numpy(hidden) @ table.T / 5.0))
    assert hidden.grad is not None


def test_a_cpu_with_fast_bfloat16_keeps_the_native_product(monkeypatch):
    import torch

    monkeypatch.setenv("KERAS_GEMMA_TORCH_NATIVE_16BIT", "1")
    layer = GemmaEinsumDense("btd,fd->btf", output_shape=(None, 6), dtype="bfloat16")
    layer.build((1, 3, 8))
    assert not sixteen.runs_here(layer.kernel, training=True)
    x = _bfloat16((1, 3, 8), 8)
    with torch.enable_grad():
        out = layer(x, training=True)
    assert "Float32Einsum" not in type(out.grad_fn).__name__
    _close(out, np.einsum("btd,fd->btf", _numpy(x), _numpy(layer.kernel.value)))
