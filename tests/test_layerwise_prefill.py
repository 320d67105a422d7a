"""LayerwisePrefill (JAX, 16-bit weights) fills the same caches as the one-program prefill."""

import keras
import numpy as np
import pytest
from conftest import to_numpy
from test_causal_lm import _tiny_lm

from keras_gemma.generation.generator import Generator
from keras_gemma.generation.layerwise_prefill import LayerwisePrefill

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "jax", reason="the block-by-block prefill is JAX's (XLA on CPU)"
)


def test_caches_equal_the_whole_model_prefill():
    # Gemma 3 switches: a global block every 3rd, so the blocks have two configurations and
    # two programs serve five blocks.
    lm = _tiny_lm(num_layers=5, sliding_window_pattern=3, use_query_key_norm=True)
    generator = Generator(lm)
    tokens = keras.ops.convert_to_tensor(
        np.random.default_rng(0).integers(4, 128, size=(2, 16)).astype("int32")
    )
    expected = generator._prefill(tokens, 11)
    counted = []
    layerwise = LayerwisePrefill(lm, counted=lambda f: counted.append(1) or f)
    actual = layerwise(tokens, generator._empty_caches(2, 16), 11)
    assert len(counted) == 3  # the embedding, a local block, a global block
    assert len(actual) == len(expected) == 5
    for got, want in zip(actual, expected):
        np.testing.assert_allclose(to_numpy(got), to_numpy(want), atol=1e-5, rtol=0)
    assert np.abs(to_numpy(actual[-1])[:, :, :11]).max() > 0  # the prompt's keys were written
    np.testing.assert_array_equal(to_numpy(actual[-1])[:, :, 11:], 0)  # nothing past it


def test_bfloat16_generate_uses_it_and_matches_the_float32_prompt_caches():
    lm = _tiny_lm(dtype="bfloat16")
    assert lm.generator._steps_from_python()
    prefill = lm.generator._make_prefill(8)
    tokens = keras.ops.convert_to_tensor(np.full((1, 16), 7, "int32"))
    caches = prefill(tokens)
    reference = _tiny_lm(dtype="float32").generator._prefill(tokens, 8)
    for got, want in zip(caches, reference):
        # bfloat16 keys and values of the same weights: within bfloat16 rounding.
        np.testing.assert_allclose(to_numpy(got), to_numpy(want), atol=0.1, rtol=0.05)


def test_layerwise_step_equals_the_one_program_step(monkeypatch):
    from keras_gemma.generation.greedy_sampler import GreedySampler
    from keras_gemma.generation.layerwise_step import LayerwiseStep

    lm = _tiny_lm(num_layers=3, sliding_window_pattern=3)
    generator = Generator(lm)
    rng = np.random.default_rng(1)
    tokens = keras.ops.convert_to_tensor(rng.integers(4, 128, size=(3, 16)).astype("int32"))
    caches = generator._prefill(tokens, 8)
    mask = keras.ops.convert_to_tensor(np.arange(16)[None].repeat(3, 0) < 8)
    state = (keras.ops.zeros((3,), "bool"), keras.ops.zeros((3,), "float32"),
             keras.ops.convert_to_tensor(np.zeros(2, "int32")))
    index = keras.ops.convert_to_tensor(np.int32(9))
    expected = generator._make_step(GreedySampler(), (), 0, rows=3)(
        tokens, caches, index, mask, *state
    )
    monkeypatch.setattr(Generator, "_steps_from_python", lambda self: True)
    step = generator._make_step(GreedySampler(), (), 0, rows=3)
    assert isinstance(step, LayerwiseStep)
    actual = step(tokens, caches, index, mask, *state)
    np.testing.assert_array_equal(to_numpy(actual[0]), to_numpy(expected[0]))  # tokens
    for got, want in zip(actual[1], expected[1]):  # caches
        np.testing.assert_allclose(to_numpy(got), to_numpy(want), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(to_numpy(actual[2]), to_numpy(expected[2]))
