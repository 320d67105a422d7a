"""Training through int8 layers on torch: the dequantized products' numbers, and autograd
keeps the int8 weights for backward, never a float copy of them."""

import keras
import numpy as np
import pytest
from conftest import BACKEND

from keras_gemma.layers.lora_einsum import GemmaEinsumDense
from keras_gemma.layers.tied_embedding import GemmaReversibleEmbedding
from keras_gemma.layers.torch_int8_training import backward_equation

pytestmark = pytest.mark.skipif(BACKEND != "torch", reason="torch's autograd")


def test_backward_equation_transposes_the_product():
    assert backward_equation("btnh,dnh->btd") == "btd,dnh->btnh"
    with pytest.raises(ValueError, match="summed alone"):
        backward_equation("btd,f->btf")


def _saved_float_sizes(run):
    """The sizes of the floating-point tensors autograd saves for backward during `run()`."""
    import torch

    sizes = []

    def pack(tensor):
        if tensor.is_floating_point():
            sizes.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = run()
    return result, sizes


def _int8(shape, seed):
    return np.random.default_rng(seed).integers(-127, 128, shape).astype("int8")


@pytest.mark.parametrize("onednn", ["0", "1"])  # torch's default products, and oneDNN's
@pytest.mark.parametrize("equation", ["btd,fd->btf", "btnh,dnh->btd"])
def test_int8_lora_layer_saves_no_float_kernel_and_its_gradients_are_right(
    equation, onednn, monkeypatch
):
    monkeypatch.setenv("KERAS_GEMMA_TORCH_ONEDNN", onednn)
    import torch

    # Inputs smaller than the kernel, so that the sizes below tell them apart.
    inputs_shape = (1, 2, 8) if equation.startswith("btd") else (1, 2, 2, 4)
    output_shape = (None, 6) if equation.startswith("btd") else (None, 8)
    layer = GemmaEinsumDense(equation, output_shape=output_shape)
    layer.build(inputs_shape)
    layer.quantize("int8")
    layer._kernel.assign(_int8(layer._kernel.shape, seed=1))
    scale = np.random.default_rng(2).uniform(50, 100, layer.kernel_scale.shape).astype("float32")
    layer.kernel_scale.assign(scale)
    kernel_scale = layer._adjust_scale_for_dequant(keras.ops.convert_to_tensor(scale))
    kernel = np.asarray(layer._kernel.value.cpu()).astype("float32") / kernel_scale.cpu().numpy()
    layer.enable_lora(2)

    inputs = torch.tensor(np.random.default_rng(3).normal(size=inputs_shape).astype("float32"),
                          requires_grad=True)
    outputs, sizes = _saved_float_sizes(lambda: layer(inputs, training=True))
    assert max(sizes) < kernel.size  # the inputs and LoRA factors, not the float kernel

    upstream = np.random.default_rng(4).normal(size=outputs.shape).astype("float32")
    (outputs * torch.tensor(upstream)).sum().backward()
    rank_term = outputs.detach().numpy() - np.einsum(equation, inputs.detach().numpy(), kernel)
    np.testing.assert_allclose(rank_term, 0, atol=1e-5)  # LoRA's b starts at zero
    letters = equation.split("->")[1] + "," + equation.split(",")[1].split("->")[0]
    wanted = np.einsum(f"{letters}->{equation.split(',')[0]}", upstream, kernel)
    np.testing.assert_allclose(inputs.grad.numpy(), wanted, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("onednn", ["0", "1"])
@pytest.mark.parametrize("soft_cap", [None, 3.0])
def test_int8_tied_logits_save_no_float_table_and_their_gradient_is_right(
    soft_cap, onednn, monkeypatch
):
    monkeypatch.setenv("KERAS_GEMMA_TORCH_ONEDNN", onednn)
    import torch

    vocabulary, width = 37, 8
    embedding = GemmaReversibleEmbedding(vocabulary, width, tie_weights=True,
                                         logit_soft_cap=soft_cap)
    embedding.build((None,))
    embedding.quantize("int8")
    embedding._embeddings.assign(_int8((vocabulary, width), seed=5))
    row_scale = np.random.default_rng(6).uniform(50, 100, (vocabulary,)).astype("float32")
    embedding.embeddings_scale.assign(row_scale)
    table = np.asarray(embedding._embeddings.value.cpu()).astype("float32") / row_scale[:, None]

    hidden = torch.tensor(np.random.default_rng(7).normal(size=(1, 2, width)).astype("float32"),
                          requires_grad=True)
    logits, sizes = _saved_float_sizes(lambda: embedding(hidden, reverse=True, training=True))
    assert max(sizes, default=0) < vocabulary * width  # the int8 table only (and the logits)

    expected = hidden.detach().numpy() @ table.T
    if soft_cap is not None:
        expected = np.tanh(expected / soft_cap) * soft_cap
    np.testing.assert_allclose(logits.detach().numpy(), expected, rtol=1e-5, atol=1e-5)
    weights = np.random.default_rng(8).normal(size=expected.shape).astype("float32")
    (logits * torch.tensor(weights)).sum().backward()
    upstream = weights if soft_cap is None else weights * (1 - (expected / soft_cap) ** 2)
    np.testing.assert_allclose(hidden.grad.numpy(), upstream @ table, rtol=1e-5, atol=1e-5)


def test_int8_tied_logits_in_blocks_equal_them_whole():
    import torch

    from keras_gemma.layers.torch_int8_training import int8_logits

    table = torch.tensor(_int8((37, 8), seed=9))
    row_scale = torch.tensor(np.random.default_rng(10).uniform(50, 100, (37,)), dtype=torch.float32)
    hidden = torch.tensor(np.random.default_rng(11).normal(size=(2, 5, 8)), dtype=torch.float32)
    blocks = [hidden.clone().requires_grad_() for _ in range(2)]
    results = [int8_logits(h, table, row_scale, 2.0, rows=rows) for h, rows in
               zip(blocks, (3, 37))]  # 13 blocks, and the whole table at once
    torch.testing.assert_close(results[0], results[1])
    for result in results:
        result.square().sum().backward()
    torch.testing.assert_close(blocks[0].grad, blocks[1].grad)
