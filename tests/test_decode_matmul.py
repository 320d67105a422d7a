"""decode_matmul equals `inputs @ kernel.T` in each of its forms, on every backend."""

import keras
import numpy as np
import pytest
from conftest import to_numpy

from keras_gemma.layers.decode_matmul import decode_matmul


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(
    "rows, in_features, out_features",
    [
        (1, 8, 24),  # out >= in: one product
        (3, 24, 8),  # in > out, a multiple: summed (out x out) chunks in bfloat16
        (2, 20, 8),  # in > out, not a multiple: one product
        (1, 16, 16),
    ],
)
@pytest.mark.parametrize("onednn", ["1", "0"])  # torch: oneDNN's product or torch's default
def test_matches_numpy(rows, in_features, out_features, dtype, onednn, monkeypatch):
    monkeypatch.setenv("KERAS_GEMMA_TORCH_ONEDNN", onednn)
    if onednn == "1" and keras.backend.backend() != "torch":
        pytest.skip("the choice is torch's")
    import keras_gemma.layers.decode_matmul as decode_matmul_module

    monkeypatch.setattr(decode_matmul_module, "ONEDNN_SMALLEST_KERNEL_BYTES", 0)
    rng = np.random.default_rng(rows + in_features)
    inputs = rng.standard_normal((rows, in_features)).astype("float32")
    kernel = rng.standard_normal((out_features, in_features)).astype("float32")
    actual = decode_matmul(
        keras.ops.cast(inputs, dtype), keras.ops.cast(kernel, dtype)
    )
    assert tuple(actual.shape) == (rows, out_features)
    actual = np.asarray(keras.ops.convert_to_numpy(keras.ops.cast(actual, "float32")))
    if dtype == "bfloat16":
        # The reference sees the same bfloat16-rounded operands; the products accumulate in
        # bfloat16 (at most 24 terms here), so allow a few bfloat16 steps of the result.
        inputs = np.asarray(keras.ops.convert_to_numpy(
            keras.ops.cast(keras.ops.cast(inputs, dtype), "float32")))
        kernel = np.asarray(keras.ops.convert_to_numpy(
            keras.ops.cast(keras.ops.cast(kernel, dtype), "float32")))
        expected = inputs @ kernel.T
        np.testing.assert_allclose(actual, expected, atol=0.1, rtol=0.02)
    else:
        np.testing.assert_allclose(actual, inputs @ kernel.T, atol=1e-5, rtol=1e-5)


def test_off_the_cpu_the_plain_product_is_used(monkeypatch):
    import keras_gemma.layers.decode_matmul as decode_matmul_module

    rng = np.random.default_rng(0)
    inputs = rng.standard_normal((2, 24)).astype("float32")
    kernel = rng.standard_normal((8, 24)).astype("float32")
    on_cpu = decode_matmul(keras.ops.cast(inputs, "bfloat16"), keras.ops.cast(kernel, "bfloat16"))
    monkeypatch.setattr(decode_matmul_module, "xla_runs_on_cpu", lambda: False)
    plain = decode_matmul(keras.ops.cast(inputs, "bfloat16"), keras.ops.cast(kernel, "bfloat16"))
    expected = keras.ops.matmul(
        keras.ops.cast(inputs, "bfloat16"), keras.ops.transpose(keras.ops.cast(kernel, "bfloat16"))
    )
    def as_numpy(x):
        return to_numpy(keras.ops.cast(x, "float32"))

    np.testing.assert_array_equal(as_numpy(plain), as_numpy(expected))
    np.testing.assert_allclose(as_numpy(plain), as_numpy(on_cpu), atol=0.25, rtol=0.02)


def _column_major(variable):
    """Whether a kernel [outputs..., inputs] holds its last (input) axis outermost in memory."""
    value = variable.value
    order = (value.ndim - 1,) + tuple(range(value.ndim - 1))
    return value.permute(*order).is_contiguous() and not value.is_contiguous()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "mixed_bfloat16"])
def test_torch_lays_out_wide_float32_kernels_column_major(dtype, tmp_path, monkeypatch):
    """On torch with its default product (not oneDNN's), float32 kernels with more outputs
    than inputs (the tied embedding, the query and gating projections here) are stored
    column-major, built or loaded, and give the same logits; the others, and every 16-bit
    kernel, stay row-major. Elsewhere the preset round trip alone is checked (in float32,
    for CI time)."""
    from conftest import tiny_config

    if keras.backend.backend() != "torch" and dtype != "float32":
        pytest.skip("the 16-bit cases check torch's memory layout")
    monkeypatch.setenv("KERAS_GEMMA_TORCH_ONEDNN", "0")

    from keras_gemma import GemmaBackbone

    config = tiny_config(head_dim=16, intermediate_dim=128)  # query 64 x 32, gating 64 x 32
    backbone = GemmaBackbone(**config, dtype=dtype)
    rng = np.random.default_rng(0)
    for variable in backbone.weights:
        variable.assign(rng.normal(0, 0.2, variable.shape).astype("float32"))
    backbone.save_to_preset(tmp_path / "preset")
    restored = GemmaBackbone.from_preset(str(tmp_path / "preset"), dtype=dtype)
    inputs = {"token_ids": np.array([[2, 5, 9, 14]], "int32"),
              "padding_mask": np.ones((1, 4), "int32")}
    for model in (backbone, restored):
        hidden = model(inputs)
        logits = model.token_embedding(hidden, reverse=True)
        np.testing.assert_allclose(
            to_numpy(keras.ops.cast(logits, "float32")),
            to_numpy(keras.ops.cast(backbone.token_embedding(backbone(inputs), reverse=True),
                                    "float32")),
            atol=1e-5,
        )
    if keras.backend.backend() != "torch":
        return
    wide = ("token_embedding/embeddings", "query/kernel", "ffw_gating/kernel",
            "ffw_gating_2/kernel")
    for model in (backbone, restored):
        kernels = [v for v in model.weights if len(v.shape) >= 2]
        laid_out = {v.path for v in kernels if _column_major(v)}
        expected = {v.path for v in kernels if v.path.endswith(wide)} if dtype == "float32" else set()
        assert laid_out == expected
        assert all(v.value.is_contiguous() for v in kernels if v.path not in expected)


def test_torch_decodes_through_onednn_with_row_major_kernels(monkeypatch):
    """Where oneDNN's product is chosen for decoding (it uses every torch thread, torch's
    default float32 matrix-vector product one), the kernels stay row-major, the traced decode
    step replays oneDNN's operator inlined (no TorchScript call left), and the greedy ids
    equal those decoded through torch's default product with column-major kernels, and the
    argmax of a full forward pass without a cache."""
    if keras.backend.backend() != "torch":
        pytest.skip("torch's product choice")
    from conftest import tiny_config

    from conftest import traced_steps

    from keras_gemma import GemmaBackbone, GemmaCausalLM

    import keras_gemma.layers.decode_matmul as decode_matmul_module

    # The tiny kernels are below the size where oneDNN pays: take it for every product here.
    monkeypatch.setattr(decode_matmul_module, "ONEDNN_SMALLEST_KERNEL_BYTES", 0)

    def decoded(onednn):
        monkeypatch.setenv("KERAS_GEMMA_TORCH_ONEDNN", onednn)
        backbone = GemmaBackbone(**tiny_config(head_dim=16, intermediate_dim=128))
        rng = np.random.default_rng(0)
        for variable in backbone.weights:
            variable.assign(rng.normal(0, 0.3, variable.shape).astype("float32"))
        lm = GemmaCausalLM(backbone)
        token_ids = np.zeros((1, 12), "int32")
        token_ids[0, :3] = [2, 7, 11]
        prompt = {"token_ids": token_ids, "padding_mask": token_ids != 0}
        ids = to_numpy(lm.generate(prompt, stop_token_ids=None)["token_ids"])
        return lm, ids, traced_steps(lm)[0].graph

    lm, ids, graph = decoded("1")
    kinds = [node.kind() for node in graph.nodes()]
    assert kinds.count("mkldnn::_linear_pointwise") >= 7  # 6 projections a block + logits
    assert "prim::CallFunction" not in kinds
    assert all(v.value.is_contiguous() for v in lm.backbone.weights)
    _, default_ids, default_graph = decoded("0")
    assert "mkldnn::_linear_pointwise" not in [node.kind() for node in default_graph.nodes()]
    np.testing.assert_array_equal(ids, default_ids)
    logits = lm.backbone.token_embedding(
        lm.backbone({"token_ids": ids[:, :-1], "padding_mask": np.ones((1, 11), "int32")}),
        reverse=True,
    )
    np.testing.assert_array_equal(ids[0, 3:], np.argmax(to_numpy(logits)[0, 2:], axis=-1))
