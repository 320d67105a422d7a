"""Shared fixtures: tiny architectures, reproducible seeds, one torch thread.

The backend is chosen by KERAS_BACKEND before anything imports keras; the README's test
command runs the whole suite once per backend.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The tests' models are tiny, so XLA (JAX, and TensorFlow's jit_compile) spends its time
# compiling, not running: LLVM's optimization passes at level 0 cut the JAX suite by ~40%
# and the TensorFlow one by ~15% on the 2-core CI machine (measured on test_samplers and
# test_causal_lm: 200 s -> 118 s on JAX). Matrix products call the same library kernels at
# any level, so the real 270M's tests run as fast. Subprocesses inherit the flag.
# KERAS_GEMMA_TEST_XLA_OPTIMIZE=1 keeps XLA's default level.
if os.environ.get("KERAS_GEMMA_TEST_XLA_OPTIMIZE", "0") in ("0", ""):
    _flags = os.environ.get("XLA_FLAGS", "")
    if "xla_backend_optimization_level" not in _flags:
        os.environ["XLA_FLAGS"] = (_flags + " --xla_backend_optimization_level=0").strip()

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

BACKEND = keras.backend.backend()

if BACKEND == "torch":
    import torch

    # Two torch threads on a two-core machine slow 20-40x whenever anything else runs.
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(1234)
    yield


@pytest.fixture
def backend():
    return BACKEND


def tiny_config(**overrides):
    """Arguments of a tiny Gemma 1 `GemmaBackbone`; a test overrides what it needs.

    Two layers, 4 query heads over 2 key/value heads, hidden 32, FFN width 32, head_dim 8:
    small enough to build in milliseconds on every backend, large enough that grouped-query
    attention and every projection are exercised.
    """
    config = dict(
        vocabulary_size=96,
        num_layers=2,
        num_query_heads=4,
        num_key_value_heads=2,
        hidden_dim=32,
        intermediate_dim=64,
        head_dim=8,
    )
    config.update(overrides)
    return config


def to_numpy(x):
    """Any backend tensor (or numpy array) as a numpy array."""
    return np.asarray(keras.ops.convert_to_numpy(x))


def assign_random_weights(backbone, seed=0, std=0.3):
    """Every weight of `backbone` drawn from N(0, std): large enough that a tiny model's
    greedy continuations vary from token to token."""
    rng = np.random.default_rng(seed)
    for variable in backbone.weights:
        variable.assign(rng.normal(0, std, variable.shape).astype("float32"))
    return backbone


def short_prompt():
    """A token-id dict of one row, 3 prompt tokens then room for 9 more."""
    token_ids = np.zeros((1, 12), "int32")
    token_ids[0, :3] = [2, 7, 11]
    return {"token_ids": token_ids, "padding_mask": token_ids != 0}


def traced_steps(lm):
    """The `TracedStep`s (torch) that `lm.generate` and `stream` made so far."""
    from keras_gemma.generation.torch_step import TracedStep

    return [f for f in lm.generator._functions.values() if isinstance(f, TracedStep)]


@pytest.fixture(scope="session")
def sentencepiece_proto(tmp_path_factory):
    """Path to a tiny SentencePiece model with Gemma's settings, trained once per session.

    `<start_of_turn>` is id 106 and `<end_of_turn>` id 107, as in Gemma 1 and 2; see
    tests/sentencepiece_model.py.
    """
    from sentencepiece_model import gemma_like_model_file

    return gemma_like_model_file(str(tmp_path_factory.mktemp("sentencepiece")))


@pytest.fixture(scope="session")
def tiny_preset(sentencepiece_proto, tmp_path_factory):
    """A keras_gemma preset directory holding a tiny random GemmaCausalLM and tokenizer.

    For tests that load by handle, as a user would (guides, the command line).
    """
    from keras_gemma import GemmaBackbone, GemmaCausalLM, GemmaCausalLMPreprocessor
    from keras_gemma import GemmaTokenizer

    backbone = GemmaBackbone(**tiny_config(vocabulary_size=1000), dtype="float32")
    rng = np.random.default_rng(0)
    for variable in backbone.weights:
        variable.assign(rng.normal(0, 0.2, variable.shape).astype("float32"))
    tokenizer = GemmaTokenizer(proto=sentencepiece_proto)
    lm = GemmaCausalLM(backbone, GemmaCausalLMPreprocessor(tokenizer, sequence_length=64))
    directory = str(tmp_path_factory.mktemp("tiny_preset"))
    lm.save_to_preset(directory)
    return directory
