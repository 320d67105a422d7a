"""Contrastive search: KerasHub's ContrastiveSampler gives the same text on the same weights,
alpha=0 is greedy search, and every decode path (compiled loop, Python-driven loop, stream)
picks the same tokens."""

import numpy as np
import pytest
from conftest import BACKEND, traced_steps
from keras_hub_models import keras_hub_causal_lm
from test_causal_lm import _tiny_lm
from test_generation import _prompt

from keras_gemma.generation import ContrastiveSampler
from keras_gemma.generation import GreedySampler
from keras_gemma.generation.generator import Generator

PROMPTS = ["The quick brown fox", "hello", "the model of the layer"]
MAX_LENGTH = 32  # the first prompt is 16 tokens long in the session's small vocabulary


@pytest.fixture(scope="module")
def keras_hub_pair(sentencepiece_proto, tmp_path_factory):
    """(KerasHub's GemmaCausalLM, ours loaded from the preset KerasHub saved)."""
    from keras_gemma import GemmaCausalLM

    reference = keras_hub_causal_lm("gemma", sentencepiece_proto, sequence_length=24, seed=3)
    directory = str(tmp_path_factory.mktemp("keras_hub_gemma"))
    reference.save_to_preset(directory)
    return reference, GemmaCausalLM.from_preset(directory)


def generate_both(pair, make_sampler, **generate_arguments):
    """The texts of KerasHub and of keras_gemma for PROMPTS, each with `make_sampler(module)`
    where `module` is `keras_hub.samplers` or `keras_gemma.samplers`."""
    import keras_hub

    from keras_gemma import samplers

    reference, ours = pair
    reference.compile(sampler=make_sampler(keras_hub.samplers))
    ours.compile(sampler=make_sampler(samplers))
    expected = reference.generate(PROMPTS, max_length=MAX_LENGTH, **generate_arguments)
    actual = ours.generate(PROMPTS, max_length=MAX_LENGTH, **generate_arguments)
    return list(expected), actual


def test_same_text_as_keras_hub(keras_hub_pair):
    expected, actual = generate_both(
        keras_hub_pair, lambda samplers: samplers.ContrastiveSampler(), stop_token_ids=None
    )
    assert actual == expected
    greedy, _ = generate_both(
        keras_hub_pair, lambda samplers: samplers.GreedySampler(), stop_token_ids=None
    )
    # The penalty changed the text, so the agreement above is contrastive search's own.
    assert expected != greedy


def test_same_text_as_keras_hub_for_other_settings(keras_hub_pair):
    def make(samplers):
        return samplers.ContrastiveSampler(k=8, alpha=0.9, temperature=0.5)

    expected, actual = generate_both(keras_hub_pair, make, stop_token_ids=None)
    assert actual == expected


def test_same_text_as_keras_hub_with_a_stop_token(keras_hub_pair):
    _, ours = keras_hub_pair
    ours.compile(sampler="contrastive")
    packed = ours.preprocessor.generate_preprocess(PROMPTS, sequence_length=MAX_LENGTH)
    free = ours.generate(packed, stop_token_ids=None)["token_ids"]
    first = int(np.asarray(packed["padding_mask"])[0].sum())
    stop = int(free[0, first + 3])  # a token the search produces mid-way in the first row
    expected, actual = generate_both(
        keras_hub_pair, lambda samplers: samplers.ContrastiveSampler(), stop_token_ids=[stop]
    )
    assert actual == expected
    # The stop token ended the first row early (the texts alone may not show it: tiny
    # vocabularies have pieces that decode to nothing).
    stopped = ours.generate(packed, stop_token_ids=[stop])["padding_mask"]
    assert stopped[0].sum() == first + 4 < stopped.shape[1]


def test_alpha_zero_is_greedy_search(keras_hub_pair):
    _, ours = keras_hub_pair
    greedy, contrastive = (
        _generate(ours, sampler, _prompt((3, 6, 2), 24, seed=4))
        for sampler in (GreedySampler(), ContrastiveSampler(alpha=0.0))
    )
    np.testing.assert_array_equal(contrastive["token_ids"], greedy["token_ids"])
    np.testing.assert_array_equal(contrastive["padding_mask"], greedy["padding_mask"])


def _generate(lm, sampler, prompt, stop_token_ids=None):
    lm.compile(sampler=sampler)
    return lm.generate(prompt, stop_token_ids=stop_token_ids)


def test_python_driven_loop_and_stream_match_the_compiled_loop(monkeypatch):
    lm = _tiny_lm()
    prompt = _prompt((3, 6), 30, seed=5)
    sampler = ContrastiveSampler(k=4, alpha=0.5)
    free = _generate(lm, sampler, prompt)
    stop = int(free["token_ids"][0, 8])
    stopped = _generate(lm, sampler, prompt, stop_token_ids=[stop])
    assert not np.array_equal(stopped["padding_mask"], free["padding_mask"])
    monkeypatch.setattr(Generator, "_steps_from_python", lambda self: True)
    lm.generator.reset()
    for expected, stop_ids in ((free, None), (stopped, [stop])):
        actual = _generate(lm, sampler, prompt, stop_token_ids=stop_ids)
        np.testing.assert_array_equal(actual["token_ids"], expected["token_ids"])
        np.testing.assert_array_equal(actual["padding_mask"], expected["padding_mask"])
    # stream() of the first prompt yields the same continuation.
    ids, mask = (prompt[key][:1] for key in ("token_ids", "padding_mask"))
    streamed = list(lm.generator.stream(ids, mask, sampler))
    np.testing.assert_array_equal(streamed, free["token_ids"][0, 3:])
    if BACKEND == "torch":
        # Every step is traced: a single row's candidate caches are broadcast views of its
        # cache (Keras' torch `repeat` expands), which the step must not write in place.
        steps = traced_steps(lm)
        assert len(steps) >= 2 and all(step.graph is not None for step in steps)


def test_penalty_is_the_largest_cosine_similarity_to_earlier_positions():
    """One decode step against a hand computation in NumPy."""
    from conftest import to_numpy
    from keras import ops

    rng = np.random.default_rng(7)
    batch, k, length, width = 2, 3, 6, 5
    logits = rng.normal(size=(batch, 10)).astype("float32")
    history = rng.normal(size=(batch, length, width)).astype("float32")
    hidden = rng.normal(size=(batch, width)).astype("float32")
    candidate_states = rng.normal(size=(batch * k, 1, width)).astype("float32")
    index = 3  # positions 0..1 in the history, 2 is `hidden`, 3.. are not seen yet

    def run(token_ids, caches, position):
        assert int(position) == index and tuple(token_ids.shape) == (batch * k, 1)
        return ops.convert_to_tensor(candidate_states), caches

    sampler = ContrastiveSampler(k=k, alpha=0.4, temperature=0.7)
    tokens = np.zeros((batch, length), "int32")
    tokens, _, _, new_history = sampler.select_with_hidden(
        logits, hidden, run, tokens, [], np.int32(index), np.zeros((batch, length), bool),
        np.zeros((batch,), bool), history, np.zeros(2, "int32"), (), 0,
    )
    seen = history.copy()
    seen[:, 2] = hidden
    np.testing.assert_allclose(to_numpy(new_history), seen, rtol=0, atol=0)
    probabilities = np.exp(logits / 0.7)
    probabilities /= probabilities.sum(-1, keepdims=True)
    penalty_mattered = False
    for row in range(batch):
        top = np.argsort(-probabilities[row])[:k]
        states = candidate_states[row * k:(row + 1) * k, 0]
        cosine = (states @ seen[row, :index].T) / np.outer(
            np.linalg.norm(states, axis=-1), np.linalg.norm(seen[row, :index], axis=-1)
        )
        score = 0.6 * probabilities[row, top] - 0.4 * cosine.max(-1)
        assert to_numpy(tokens)[row, index] == top[np.argmax(score)]
        penalty_mattered |= np.argmax(score) != 0
    assert penalty_mattered  # the most likely token lost somewhere: the penalty was tested


def test_bfloat16_weights():
    """16-bit weights take other paths (JAX on a CPU: the block-by-block prefill, which then
    also returns the prompt's hidden states; torch: bfloat16 caches in the traced step)."""
    lm = _tiny_lm(dtype="bfloat16")
    prompt = _prompt((3, 6), 24, seed=6)
    greedy = _generate(lm, GreedySampler(), prompt)
    output = _generate(lm, ContrastiveSampler(alpha=0.0), prompt)
    np.testing.assert_array_equal(output["token_ids"], greedy["token_ids"])
    penalized = _generate(lm, ContrastiveSampler(k=4, alpha=0.6), prompt)
    assert not np.array_equal(penalized["token_ids"], greedy["token_ids"])


def test_equal_scores_pick_the_lowest_token_id_as_greedy_does():
    """16-bit logits tie often (the tiny bfloat16 model's two best logits were both
    0.89453125 in one step): greedy's argmax takes the lowest id, and so must alpha=0."""
    from conftest import to_numpy
    from keras import ops

    # 128 wide: torch's top_k then lists tied values highest id first (8 wide it did not).
    logits = np.full((3, 128), -2.0, "float32")
    logits[0, [6, 2]] = 1.5  # tied best
    logits[1, [100, 1, 5]] = 0.75  # three tied best
    logits[2, [3, 4]] = [0.5, 0.75]

    def run(token_ids, caches, position):
        return ops.ones((token_ids.shape[0], 1, 4)), caches

    length, index = 5, 2
    greedy = to_numpy(ops.argmax(logits, axis=-1))
    for k in (3, 8):
        tokens, _, _, _ = ContrastiveSampler(k=k, alpha=0.0).select_with_hidden(
            logits, np.ones((3, 4), "float32"), run, np.zeros((3, length), "int32"), [],
            np.int32(index), np.zeros((3, length), bool), np.zeros((3,), bool),
            np.zeros((3, length, 4), "float32"), np.zeros(2, "int32"), (), 0,
        )
        np.testing.assert_array_equal(to_numpy(tokens)[:, index], greedy)
    np.testing.assert_array_equal(greedy, [2, 1, 4])
