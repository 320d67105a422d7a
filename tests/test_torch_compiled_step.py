"""The decode step compiled by Inductor (`KERAS_GEMMA_TORCH_COMPILE=1`, torch on a CPU).

Its greedy ids equal the traced step's and a full forward pass's argmax: one row's products
written as Inductor's own loops (one_row_product.py: float32, and int8 with no packed int8
kernel left), two rows' through oneDNN (recorded as keras_gemma's own operator), int4
through PyTorch's packed kernel; a seeded top-k sampler draws the same tokens through both; a weight
laid out anew after compiling makes the step compile again (Inductor's code is specialized
to strides). On JAX and TensorFlow the setting changes nothing.
"""

import shutil

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

needs_compiler = pytest.mark.skipif(
    BACKEND == "torch" and shutil.which("g++") is None,
    reason="Inductor compiles C++ with g++",
)


def _lm(seed=0, std=2.0, **overrides):
    config = tiny_config(
        head_dim=32, hidden_dim=64, intermediate_dim=128, use_query_key_norm=True,
        use_post_attention_norm=True, use_post_ffw_norm=True, **overrides
    )
    return GemmaCausalLM(assign_random_weights(GemmaBackbone(**config), seed, std=std))


def _generate(lm, compiled, monkeypatch, prompts=None):
    monkeypatch.setenv("KERAS_GEMMA_TORCH_COMPILE", "1" if compiled else "0")
    lm.generator._functions = {}  # the step kind is chosen when a step is made
    prompts = short_prompt() if prompts is None else prompts
    return to_numpy(lm.generate(prompts, stop_token_ids=None)["token_ids"])


def _forward_argmax(lm, ids):
    width = ids.shape[1] - 1
    hidden = lm.backbone({"token_ids": ids[:, :-1], "padding_mask": np.ones((1, width), "int32")})
    return np.argmax(to_numpy(lm.backbone.token_embedding(hidden, reverse=True))[0], axis=-1)


# Library products in a recorded step's graph: a batch of one row takes none of them
# (one_row_product.py writes each as a multiply and a sum that Inductor compiles itself).
LIBRARY_PRODUCTS = (
    "aten.mm.default", "aten.addmm.default", "keras_gemma.onednn_linear.default",
    "aten._weight_int8pack_mm.default",
)


def _two_prompts():
    token_ids = np.repeat(short_prompt()["token_ids"], 2, axis=0)
    token_ids[1, 1] = 5
    return {"token_ids": token_ids, "padding_mask": token_ids != 0}


@needs_compiler
def test_compiled_step_decodes_as_the_traced_one(monkeypatch):
    if BACKEND == "torch":
        import keras_gemma.layers.decode_matmul as decode_matmul_module

        # oneDNN for every float32 product of several rows (the tiny kernels are below the
        # size where it pays): the compiled step must call it as keras_gemma's operator.
        monkeypatch.setenv("KERAS_GEMMA_TORCH_ONEDNN", "1")
        monkeypatch.setattr(decode_matmul_module, "ONEDNN_SMALLEST_KERNEL_BYTES", 0)
    lm = _lm()
    traced = _generate(lm, False, monkeypatch)
    compiled = _generate(lm, True, monkeypatch)
    np.testing.assert_array_equal(compiled, traced)
    np.testing.assert_array_equal(compiled[0, 3:], _forward_argmax(lm, compiled)[2:])
    if BACKEND == "torch":
        (step,) = traced_steps(lm)
        assert step.compiled, "the step fell back to tracing"
        targets = [str(node.target) for node in step.graph.nodes]
        assert not [t for t in targets if t in LIBRARY_PRODUCTS]
        assert targets.count("keras_gemma.one_row_product.default") == 9  # 4 a block + logits
    # Two rows: the library products, oneDNN's as keras_gemma's operator.
    traced = _generate(lm, False, monkeypatch, _two_prompts())
    compiled = _generate(lm, True, monkeypatch, _two_prompts())
    np.testing.assert_array_equal(compiled, traced)
    if BACKEND == "torch":
        (step,) = traced_steps(lm)
        assert step.compiled, "the step fell back to tracing"
        targets = [str(node.target) for node in step.graph.nodes]
        assert targets.count("keras_gemma.onednn_linear.default") >= 7  # 3 a block + logits


@needs_compiler
def test_a_weight_laid_out_anew_compiles_the_step_again(monkeypatch):
    lm = _lm(seed=1)
    first = _generate(lm, True, monkeypatch)
    if BACKEND != "torch":
        return
    (step,) = traced_steps(lm)
    assert step.compiled
    compiled_once = step._traced
    # The same values in the other memory order, under the same Parameter object.
    value = lm.backbone.token_embedding.embeddings.value
    row_major = value.is_contiguous()
    value.data = value.data.t().contiguous().t() if row_major else value.data.contiguous()
    assert value.is_contiguous() != row_major
    again = to_numpy(lm.generate(short_prompt(), stop_token_ids=None)["token_ids"])
    assert step._traced is not compiled_once, "the step was not compiled again"
    np.testing.assert_array_equal(again, first)


@needs_compiler
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_compiled_step_decodes_as_the_traced_one(mode, monkeypatch):
    lm = _lm(seed=2)
    lm.quantize(mode)
    traced = _generate(lm, False, monkeypatch)
    compiled = _generate(lm, True, monkeypatch)
    np.testing.assert_array_equal(compiled, traced)
    # A second, wider bucket in the same process gets a program of its own (through
    # `torch.compile`, the 270M's int8 step failed on its second bucket: a recompilation
    # under `skip_guard_eval_unsafe`).
    wide = {key: np.pad(value, ((0, 0), (0, 40))) for key, value in short_prompt().items()}
    wide_traced = _generate(lm, False, monkeypatch, wide)
    lm.generator._functions = {}
    monkeypatch.setenv("KERAS_GEMMA_TORCH_COMPILE", "1")
    first = to_numpy(lm.generate(short_prompt(), stop_token_ids=None)["token_ids"])
    second = to_numpy(lm.generate(wide, stop_token_ids=None)["token_ids"])
    np.testing.assert_array_equal(first, traced)
    np.testing.assert_array_equal(second, wide_traced)
    if BACKEND == "torch":
        steps = traced_steps(lm)
        assert len(steps) == 2 and all(step.compiled for step in steps), "fell back to tracing"
        for step in steps:
            targets = [str(node.target) for node in step.graph.nodes]
            # int8: every product one row (one_row_product.py); int4: the packed int4
            # kernel, the tied logits of an int8 table one row.
            assert not [t for t in targets if t in LIBRARY_PRODUCTS]


@needs_compiler
def test_compiled_step_samples_as_the_traced_one(monkeypatch):
    """A seeded random sampler draws the same tokens through either step (its random bits
    come from the key the step is given)."""
    from keras_gemma.samplers import TopKSampler

    # Small weights: flat enough distributions that seeds 1 and 2 draw different tokens.
    config = tiny_config(head_dim=32, hidden_dim=64, intermediate_dim=128)
    lm = GemmaCausalLM(assign_random_weights(GemmaBackbone(**config), 3, std=0.05))
    drawn = []
    for compiled in (False, True):
        lm.compile(sampler=TopKSampler(k=5, seed=1))
        drawn.append(_generate(lm, compiled, monkeypatch))
    np.testing.assert_array_equal(drawn[1], drawn[0])
    if BACKEND == "torch":
        (step,) = traced_steps(lm)
        assert step.compiled, "the step fell back to tracing"
    lm.compile(sampler=TopKSampler(k=5, seed=2))
    assert not np.array_equal(_generate(lm, True, monkeypatch), drawn[1]), "draws no randomness"


@needs_compiler
@pytest.mark.parametrize("mode", [None, "int8"])
def test_a_second_model_of_the_same_shapes_compiles_from_inductors_cache(mode, monkeypatch):
    """Inductor's on-disk cache serves a step recorded again (a new process, a new model of
    the same shapes), and the cached program reads the new model's weights: float32
    weights are its inputs; a small int8 model's packed constants are part of the key."""
    models = []
    for seed in (0, 1):
        # Large weights: small ones leave the residual stream's last token to win every step
        # (2, 7, 11, 11, 11, ... for any seed), which would not tell two models apart.
        config = tiny_config(head_dim=32, hidden_dim=64, intermediate_dim=128,
                             use_query_key_norm=True, use_post_attention_norm=True,
                             use_post_ffw_norm=True)
        lm = GemmaCausalLM(assign_random_weights(GemmaBackbone(**config), seed, std=2.0))
        if mode:
            lm.quantize(mode)
        models.append(lm)
    if BACKEND == "torch":
        from torch._dynamo.utils import counters

        counters.clear()
    ids = [_generate(lm, True, monkeypatch) for lm in models]
    traced = [_generate(lm, False, monkeypatch) for lm in models]
    np.testing.assert_array_equal(ids[0], traced[0])
    np.testing.assert_array_equal(ids[1], traced[1])
    assert not np.array_equal(ids[0], ids[1]), "the two models' weights decode alike"
    if BACKEND == "torch":
        assert counters["inductor"]["fxgraph_cache_bypass"] == 0
        assert counters["inductor"]["fxgraph_cache_hit"] >= 1
