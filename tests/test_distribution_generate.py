"""generate() and stream() under keras.distribution on 8 simulated CPU devices (JAX only).

Run by `make test-distribution` (see tests/test_distribution.py for why its own process).
Greedy ids are compared with the same weights' unsharded model; the KV caches' shardings are
read inside the compiled loop through `jax.debug.inspect_array_sharding`, which reports the
sharding XLA chose at compile time.
"""

import keras
import numpy as np
import pytest

if keras.backend.backend() != "jax":
    pytest.skip("keras.distribution is JAX-only in Keras 3.15.1", allow_module_level=True)

import jax  # noqa: E402

if jax.device_count() < 8:
    pytest.skip("needs 8 devices: run `make test-distribution`", allow_module_level=True)

from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec  # noqa: E402
from keras.distribution import DataParallel  # noqa: E402
from test_distribution import TINY, model_parallel, random_weights  # noqa: E402

from keras_gemma import GemmaBackbone, GemmaCausalLM  # noqa: E402
from keras_gemma.generation.generator import Generator  # noqa: E402

WIDTH = 16  # one length bucket


def prompts(batch, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, TINY["gemma1_kv1"]["vocabulary_size"], (batch, WIDTH)).astype("int32")
    lengths = 3 + np.arange(batch) % 4  # rows of different lengths: some read, some generate
    mask = np.arange(WIDTH)[None, :] < lengths[:, None]
    return ids * mask, mask


def causal_lm(config, weights):
    backbone = GemmaBackbone(**config)
    backbone.set_weights(weights)
    lm = GemmaCausalLM(backbone, compile=False)
    lm.compile(sampler="greedy")
    return lm


def distribution_of(shape):
    if shape == "data_parallel":
        return DataParallel(devices=jax.devices()[:8])
    return model_parallel(shape)[0]


def watch_caches(generator, seen):
    """Records the shardings of each step's token and updated caches, inside the compiled
    loop (the Generator reads `self._decode` when it builds its step)."""
    decode = generator._decode

    def watched(token, caches, index):
        logits, caches = decode(token, caches, index)
        jax.debug.inspect_array_sharding(token, callback=lambda s: seen.append(("token", s)))
        for cache in caches:
            jax.debug.inspect_array_sharding(cache, callback=lambda s: seen.append(("cache", s)))
        return logits, caches

    generator._decode = watched


def greedy_reference(config, weights, ids, mask):
    """Greedy ids from the unsharded backbone's full forward pass at every step, no KV cache
    and no Generator: an independent computation of what generate() should return."""
    backbone = GemmaBackbone(**config)
    backbone.set_weights(weights)
    tokens = ids.copy()
    full = np.ones_like(tokens, dtype="int32")  # the prompts are left-aligned: no holes
    for position in range(int(mask.sum(axis=1).min()), WIDTH):
        hidden = backbone({"token_ids": tokens, "padding_mask": full})
        logits = np.asarray(backbone.token_embedding(hidden[:, position - 1:position],
                                                     reverse=True))
        chosen = logits[:, 0].argmax(axis=-1)
        tokens[:, position] = np.where(mask[:, position], tokens[:, position], chosen)
    return tokens


def expected_cache_spec(shape):
    if shape == "data_parallel":
        return PartitionSpec("batch", None, None, None, None)
    # head_dim on the model axis like the key/value kernels; rows on the batch axis.
    return PartitionSpec("batch", None, None, None, "model")


# Every generation and every distribution once, not the cross product (which the logits
# tests cover): each sharded loop compiles for 5-20 s on 2 shared CPU cores.
CASES = [("gemma1_kv1", (2, 4)), ("gemma1_kv4", (1, 8)), ("gemma2", "data_parallel"),
         ("gemma3", (8, 1))]


@pytest.mark.parametrize("name,shape", CASES)
def test_greedy_ids_equal_unsharded_and_caches_are_sharded(name, shape):
    config = TINY[name]
    weights = random_weights(GemmaBackbone(**config))
    ids, mask = prompts(8)
    expected = greedy_reference(config, weights, ids, mask)
    distribution = distribution_of(shape)
    with distribution.scope():
        lm = causal_lm(config, weights)
        seen = []
        watch_caches(lm.generator, seen)
        output = lm.generate({"token_ids": ids, "padding_mask": mask}, stop_token_ids=None)
        np.testing.assert_array_equal(output["token_ids"], expected)
        # Another max_length in the same bucket: the same program.
        shorter = lm.generate({"token_ids": ids[:, :12], "padding_mask": mask[:, :12]},
                              stop_token_ids=None)
        np.testing.assert_array_equal(shorter["token_ids"], expected[:, :12])
        if shape != (1, 8):
            # 7 rows do not divide the batch axis (2 or 8): padded to 8, the same program.
            seven = lm.generate({"token_ids": ids[:7], "padding_mask": mask[:7]},
                                stop_token_ids=None)
            np.testing.assert_array_equal(seven["token_ids"], expected[:7])
        assert lm.generator.trace_count == 1
    mesh = distribution.device_mesh.backend_mesh
    caches = [s for kind, s in seen if kind == "cache"]
    tokens = [s for kind, s in seen if kind == "token"]
    assert len(caches) == config["num_layers"] and len(tokens) == 1  # traced once
    cache_sharding = NamedSharding(mesh, expected_cache_spec(shape))
    for sharding in caches:
        assert sharding.is_equivalent_to(cache_sharding, 5), (sharding, cache_sharding)
    # The inputs were split along the batch axis (a (1, 8) mesh has one batch shard).
    assert tokens[0].is_equivalent_to(NamedSharding(mesh, PartitionSpec("batch", None)), 2)
    if shape != (1, 8):
        assert not caches[0].is_fully_replicated  # rows, and head_dim, are split


def test_stream_of_one_prompt_on_two_batch_shards():
    config = TINY["gemma1_kv1"]
    weights = random_weights(GemmaBackbone(**config))
    ids, mask = prompts(1, seed=5)
    expected = greedy_reference(config, weights, ids, mask)[0, int(mask.sum()):]
    with distribution_of((2, 4)).scope():
        lm = causal_lm(config, weights)
        # One row on 2 batch shards: streamed as 2 copies of the row.
        assert list(lm.generator.stream(ids, mask, lm.sampler)) == list(expected)
        assert lm.generator.trace_count == 2  # the prefill and one step program
        assert list(lm.generator.stream(ids, mask, lm.sampler)) == list(expected)
        assert lm.generator.trace_count == 2


def test_the_batch_rule():
    from keras_gemma.generation.sharding import GenerationSharding

    with distribution_of((2, 4)).scope():
        lm = causal_lm(TINY["gemma1_kv4"], random_weights(GemmaBackbone(**TINY["gemma1_kv4"])))
        sharding = GenerationSharding.current(lm)
    assert sharding.cache_axes == ("batch", None, None, None, "model")
    assert [sharding.rows(n) for n in (1, 2, 3, 4)] == [2, 2, 4, 4]
    assert sharding.rows(3, beams=2) == 3  # 6 beam rows divide by 2
    ids, mask = prompts(3)
    padded, padded_mask = sharding.rows_for(ids, mask)
    np.testing.assert_array_equal(padded[3], ids[2])
    np.testing.assert_array_equal(padded_mask[:3], mask)
    assert GenerationSharding.current(lm).key == ()  # outside the distribution's scope
    assert isinstance(lm.generator, Generator)
