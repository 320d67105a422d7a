"""Projections of the same rows share one decode product on torch (shared_rows.py).

On every backend: `decode_products` equals one product per kernel, and a model decodes the
argmax of its own full forward pass. On torch: the query/key/value and gating kernels lie in
one buffer each, the traced step makes 4 products a block instead of 7, its greedy ids equal
those of a model built without sharing, training and a preset round trip keep working, and a
kernel moved elsewhere after the trace makes the step trace again rather than read stale
memory.
"""

import keras
import numpy as np
import pytest
from conftest import (
    BACKEND,
    assign_random_weights,
    short_prompt,
    tiny_config,
    to_numpy,
    traced_steps,
)

from keras_gemma import GemmaBackbone, GemmaCausalLM
from keras_gemma.layers import shared_rows


@pytest.fixture(autouse=True)
def _row_major_kernels(monkeypatch):
    # Shared buffers need row-major kernels: the decode product through oneDNN (at one torch
    # thread its timed choice is a coin toss, both forms being as fast).
    monkeypatch.setenv("KERAS_GEMMA_TORCH_ONEDNN", "1")


def _lm(seed=0, share=True):
    with pytest.MonkeyPatch.context() as patch:
        if not share:
            import keras_gemma.layers.attention as attention
            import keras_gemma.layers.feed_forward as feed_forward

            patch.setattr(attention, "share_rows", lambda variables: None)
            patch.setattr(feed_forward, "share_rows", lambda variables: None)
        backbone = GemmaBackbone(**tiny_config(head_dim=16, intermediate_dim=128))
    return GemmaCausalLM(assign_random_weights(backbone, seed))


def _greedy(lm):
    return to_numpy(lm.generate(short_prompt(), stop_token_ids=None)["token_ids"])


def _argmax_of_forward(lm, ids):
    hidden = lm.backbone({"token_ids": ids[:, :-1], "padding_mask": np.ones_like(ids[:, :-1])})
    return np.argmax(to_numpy(lm.backbone.token_embedding(hidden, reverse=True))[0], axis=-1)


def _traced_step(lm):
    steps = traced_steps(lm)
    assert len(steps) == 1
    return steps[0]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decode_products_equal_one_product_each(dtype):
    rng = np.random.default_rng(1)
    rows = keras.ops.cast(rng.standard_normal((2, 8)).astype("float32"), dtype)
    shapes = [(2, 4, 8), (1, 4, 8), (1, 4, 8)]
    kernels = [keras.ops.cast(rng.standard_normal(s).astype("float32"), dtype) for s in shapes]
    products = shared_rows.decode_products(rows, kernels)
    for product, kernel in zip(products, kernels):
        expected = to_numpy(keras.ops.cast(rows, "float32")) @ to_numpy(
            keras.ops.cast(kernel, "float32")).reshape(-1, 8).T
        tolerance = 1e-5 if dtype == "float32" else 0.1
        np.testing.assert_allclose(to_numpy(keras.ops.cast(product, "float32")), expected,
                                   atol=tolerance, rtol=tolerance)


def test_decoding_is_the_argmax_of_the_forward_pass():
    lm = _lm()
    ids = _greedy(lm)
    np.testing.assert_array_equal(ids[0, 3:], _argmax_of_forward(lm, ids)[2:])


@pytest.mark.skipif(BACKEND != "torch", reason="shared storage is torch's")
def test_torch_kernels_share_a_buffer_and_decode_in_fewer_products():
    lm = _lm()
    for block in lm.backbone.transformer_layers:
        attention = block.attention
        groups = [
            [attention.query_dense.kernel, attention.key_dense.kernel,
             attention.value_dense.kernel],
            [block.gating_ffw.kernel, block.gating_ffw_2.kernel],
        ]
        for group in groups:
            values = [variable.value for variable in group]
            assert all(v.untyped_storage().data_ptr() == values[0].untyped_storage().data_ptr()
                       for v in values)
    ids = _greedy(lm)
    kinds = [node.kind() for node in _traced_step(lm).graph.nodes()]
    products = sum(kinds.count(k) for k in ("mkldnn::_linear_pointwise", "aten::mm",
                                             "aten::matmul", "aten::linear"))
    layers = len(lm.backbone.transformer_layers)
    assert products == 4 * layers + 1  # qkv, output, gating pair, down; the tied logits
    unshared = _lm(share=False)
    np.testing.assert_array_equal(ids, _greedy(unshared))
    kinds = [node.kind() for node in _traced_step(unshared).graph.nodes()]
    assert "aten::as_strided" not in kinds


@pytest.mark.skipif(BACKEND != "torch", reason="shared storage is torch's")
def test_a_kernel_moved_after_the_trace_traces_again():
    lm = _lm()
    ids = _greedy(lm)
    step = _traced_step(lm)
    graph = step.graph
    key = lm.backbone.transformer_layers[0].attention.key_dense.kernel
    key.value.data = key.value.data.clone()  # same values, elsewhere in memory
    np.testing.assert_array_equal(_greedy(lm), ids)
    assert _traced_step(lm).graph is not graph, "the step was not traced again"
    key.assign(np.zeros(key.shape, "float32"))  # the new place is what the step now reads
    changed = _greedy(lm)
    np.testing.assert_array_equal(changed[0, 3:], _argmax_of_forward(lm, changed)[2:])


@pytest.mark.skipif(BACKEND != "torch", reason="shared storage is torch's")
def test_training_and_presets_keep_the_shared_buffer(tmp_path):
    ids = np.random.default_rng(0).integers(1, 64, size=(2, 9)).astype("int32")
    x = {"token_ids": ids[:, :-1], "padding_mask": np.ones((2, 8), "int32")}

    def trained(lm):
        lm.compile(optimizer=keras.optimizers.Adam(learning_rate=1e-2),
                   loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        for _ in range(2):
            lm.train_on_batch(x, ids[:, 1:])
        return lm

    shared = trained(_lm())
    unshared = trained(_lm(share=False))
    for ours, reference in zip(shared.backbone.weights, unshared.backbone.weights):
        np.testing.assert_allclose(to_numpy(ours), to_numpy(reference), rtol=1e-5, atol=1e-6)
    attention = shared.backbone.transformer_layers[0].attention
    query, key = attention.query_dense.kernel.value, attention.key_dense.kernel.value
    assert key.data_ptr() == query.data_ptr() + query.numel() * query.element_size()
    shared.backbone.save_to_preset(str(tmp_path / "preset"))
    restored = GemmaCausalLM(GemmaBackbone.from_preset(str(tmp_path / "preset")))
    np.testing.assert_array_equal(_greedy(restored), _greedy(shared))
