"""Samplers: distributions, reproducibility, and agreement with greedy search where they must."""

import numpy as np
import pytest
from conftest import to_numpy
from test_causal_lm import _tiny_lm
from test_contrastive_sampler import generate_both
from test_contrastive_sampler import keras_hub_pair  # noqa: F401 (a fixture)
from test_generation import _prompt

from keras_gemma.generation import BeamSampler
from keras_gemma.generation import GreedySampler
from keras_gemma.generation import RandomSampler
from keras_gemma.generation import TopKSampler
from keras_gemma.generation import TopPSampler
from keras_gemma.generation import get_sampler
from keras_gemma.generation import serialize_sampler

LOGITS = np.log(np.array([0.5, 0.25, 0.15, 0.07, 0.03], "float32"))
ROWS = 20000  # one draw per row: standard error of a frequency <= 0.0036


def _frequencies(sampler, logits=LOGITS, step=3):
    batch = np.tile(logits, (ROWS, 1))
    tokens = to_numpy(sampler.next_token(batch, np.array([7, 1], "int32"), step))
    return np.bincount(tokens, minlength=len(logits)) / ROWS


def test_random_sampler_follows_the_softmax():
    np.testing.assert_allclose(_frequencies(RandomSampler()), np.exp(LOGITS), atol=0.015)
    # Temperature 2 flattens: probabilities proportional to p ** (1 / 2).
    flat = np.exp(LOGITS / 2) / np.exp(LOGITS / 2).sum()
    np.testing.assert_allclose(_frequencies(RandomSampler(temperature=2.0)), flat, atol=0.015)


def test_top_k_and_top_p_keep_only_their_candidates():
    top2 = np.exp(LOGITS[:2]) / np.exp(LOGITS[:2]).sum()
    np.testing.assert_allclose(_frequencies(TopKSampler(k=2))[:2], top2, atol=0.015)
    assert _frequencies(TopKSampler(k=2))[2:].sum() == 0
    # p = 0.7: 0.5 alone is short of it, 0.5 + 0.25 crosses it, so two tokens stay.
    frequencies = _frequencies(TopPSampler(p=0.7))
    np.testing.assert_allclose(frequencies[:2], top2, atol=0.015)
    assert frequencies[2:].sum() == 0
    # A cap on the sort does not change p's meaning.
    np.testing.assert_allclose(_frequencies(TopPSampler(p=0.7, k=3)), frequencies, atol=0.015)


def test_greedy_and_degenerate_samplers_pick_the_argmax():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(64, 50)).astype("float32")
    expected = logits.argmax(-1)
    key = np.array([1, 2], "int32")
    for sampler in (GreedySampler(), TopKSampler(k=1), TopPSampler(p=1e-6)):
        np.testing.assert_array_equal(to_numpy(sampler.next_token(logits, key, 0)), expected)


def test_draws_depend_on_key_and_step_only():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(8, 1000)).astype("float32")
    sampler = RandomSampler()
    a = to_numpy(sampler.next_token(logits, np.array([5, 0], "int32"), 4))
    b = to_numpy(sampler.next_token(logits, np.array([5, 0], "int32"), 4))
    np.testing.assert_array_equal(b, a)
    assert not np.array_equal(to_numpy(sampler.next_token(logits, np.array([5, 0], "int32"), 5)), a)
    assert not np.array_equal(to_numpy(sampler.next_token(logits, np.array([6, 0], "int32"), 4)), a)


def test_names_and_serialization():
    assert isinstance(get_sampler("greedy"), GreedySampler)
    assert isinstance(get_sampler("beam"), BeamSampler)
    assert type(get_sampler("contrastive")).__name__ == "ContrastiveSampler"
    sampler = TopPSampler(p=0.8, k=40, temperature=0.7, seed=3)
    restored = get_sampler(serialize_sampler(sampler))
    assert type(restored) is TopPSampler and restored.get_config() == sampler.get_config()
    with pytest.raises(ValueError, match="Unknown sampler"):
        get_sampler("nucleus")


# In generate(), on a small model.


@pytest.fixture(scope="module")
def lm():
    return _tiny_lm()


def _generate(lm, sampler, prompt, stop_token_ids=None):
    lm.compile(sampler=sampler)
    return lm.generate(prompt, stop_token_ids=stop_token_ids)


def test_seeded_sampling_is_reproducible(lm):
    prompt = _prompt((3, 5), 24, seed=1)
    first = _generate(lm, TopKSampler(k=20, seed=42), prompt)["token_ids"]
    again = _generate(lm, TopKSampler(k=20, seed=42), prompt)["token_ids"]
    np.testing.assert_array_equal(first, again)
    other = _generate(lm, TopKSampler(k=20, seed=43), prompt)["token_ids"]
    assert not np.array_equal(first, other)
    # One seeded sampler's successive calls differ, and repeat as a sequence.
    sampler = TopKSampler(k=20, seed=42)
    sequence = [_generate(lm, sampler, prompt)["token_ids"] for _ in range(2)]
    np.testing.assert_array_equal(sequence[0], first)
    assert not np.array_equal(sequence[1], first)


def _continuation_log_prob(lm, tokens, prompt_mask):
    """Summed log-probability of the tokens after each row's prompt (a full forward pass)."""
    logits = to_numpy(lm({"token_ids": tokens, "padding_mask": np.ones_like(tokens)}))
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    picked = np.take_along_axis(log_probs[:, :-1], tokens[:, 1:, None], -1)[..., 0]
    return (picked * ~prompt_mask[:, 1:]).sum(-1)


def test_single_beam_equals_greedy_and_more_beams_score_higher(lm):
    prompt = _prompt((3, 5), 16, seed=2)
    mask = prompt["padding_mask"]
    greedy = _generate(lm, "greedy", prompt)["token_ids"]
    single_beam = _generate(lm, BeamSampler(num_beams=1), prompt)["token_ids"]
    np.testing.assert_array_equal(single_beam, greedy)
    beams = _generate(lm, BeamSampler(num_beams=4), prompt)["token_ids"]
    np.testing.assert_array_equal(beams[mask], prompt["token_ids"][mask])
    assert not np.array_equal(beams, greedy)  # this prompt has a better path than greedy's
    # Beam search finds a continuation at least as likely as greedy search's.
    beam_score = _continuation_log_prob(lm, beams, mask)
    assert (beam_score >= _continuation_log_prob(lm, greedy, mask) - 1e-4).all()


# KerasHub's API (keras_hub.samplers), used verbatim with the import swapped.

KERAS_HUB_NAMES = ["greedy", "top_k", "top_p", "random", "beam", "contrastive"]


def _keras_hub_samplers():
    import keras_hub

    return keras_hub.samplers


def _ours():
    from keras_gemma import samplers

    return samplers


def _shared_config(ours, theirs):
    """Our config restricted to KerasHub's keys (ours may add a seed), and KerasHub's."""
    theirs = theirs.get_config()
    return {key: ours.get_config().get(key, "missing") for key in theirs}, theirs


@pytest.mark.parametrize("name", KERAS_HUB_NAMES)
def test_every_keras_hub_name_gives_the_same_sampler_and_defaults(name):
    ours, theirs = _ours().get(name), _keras_hub_samplers().get(name)
    assert type(ours).__name__ == type(theirs).__name__
    mine, expected = _shared_config(ours, theirs)
    assert mine == expected
    lm = _tiny_lm()
    lm.compile(sampler=name)
    assert type(lm.sampler).__name__ == type(theirs).__name__


def _keras_hub_usages(samplers):
    """Constructor calls from KerasHub's docstrings and guides, and positional forms."""
    return [
        samplers.TopKSampler(k=5, temperature=0.7),
        samplers.TopKSampler(3, 42),
        samplers.TopPSampler(p=0.1, k=1_000),
        samplers.TopPSampler(0.5, 10, 7, temperature=0.9),
        samplers.RandomSampler(seed=3, temperature=0.8),
        samplers.RandomSampler(11),
        samplers.GreedySampler(),
        samplers.BeamSampler(num_beams=2, return_all_beams=False),
        samplers.BeamSampler(4, True, temperature=0.6),
        samplers.ContrastiveSampler(k=5),
        samplers.ContrastiveSampler(4, 0.3, temperature=0.5),
    ]


def test_keras_hub_constructor_calls_give_the_same_settings():
    for ours, theirs in zip(_keras_hub_usages(_ours()), _keras_hub_usages(_keras_hub_samplers())):
        mine, expected = _shared_config(ours, theirs)
        assert mine == expected, type(theirs).__name__


def test_keras_hub_configs_deserialize_to_our_samplers():
    samplers, keras_hub_samplers = _ours(), _keras_hub_samplers()
    for theirs in _keras_hub_usages(keras_hub_samplers):
        ours = samplers.deserialize(keras_hub_samplers.serialize(theirs))
        assert type(ours).__module__.startswith("keras_gemma.")
        mine, expected = _shared_config(ours, theirs)
        assert mine == expected
    # From KerasHub's docstring of get():
    cfg = {"class_name": "keras_hub>GreedySampler", "config": {}}
    assert isinstance(samplers.get(cfg), samplers.GreedySampler)
    assert isinstance(samplers.get({"class_name": "TopKSampler", "config": {"k": 2}}),
                      samplers.TopKSampler)


def test_get_serialize_deserialize_semantics():
    samplers = _ours()
    for ours in _keras_hub_usages(samplers):
        restored = samplers.deserialize(samplers.serialize(ours))
        assert type(restored) is type(ours) and restored.get_config() == ours.get_config()
        assert samplers.get(ours) is ours
        assert samplers.get(samplers.serialize(ours)).get_config() == ours.get_config()
    assert samplers.get(None) is None
    assert isinstance(samplers.get(samplers.TopPSampler), samplers.TopPSampler)
    with pytest.raises(KeyError, match="lowercase"):
        samplers.get("Greedy")  # KerasHub raises KeyError here too
    with pytest.raises(ValueError, match="Could not interpret"):
        samplers.get(3)
    with pytest.raises(ValueError, match="Unknown sampler 'nucleus'"):
        samplers.get("nucleus")  # KerasHub returns the string; an error says more
    with pytest.raises(ValueError, match="speculative"):
        samplers.get("speculative")


def test_all_beams_through_generate_is_refused_with_what_to_do(lm):
    lm.compile(sampler=_ours().BeamSampler(num_beams=2, return_all_beams=True))
    with pytest.raises(ValueError, match=r"return_all_beams=False"):
        lm.generate(_prompt((3,), 8), stop_token_ids=None)


def test_keras_hub_beam_search_gives_the_same_text(keras_hub_pair):
    def make(samplers):
        return samplers.BeamSampler(num_beams=2, return_all_beams=False)

    expected, actual = generate_both(keras_hub_pair, make, stop_token_ids=None)
    assert actual == expected


def _custom_sampler_class(samplers):
    """KerasHub's custom sampler example (the Sampler docstring), verbatim."""
    import keras

    class CustomSampler(samplers.Sampler):
        def __init__(self, forbidden_tokens, **kwargs):
            super().__init__(**kwargs)
            self.forbidden_tokens = forbidden_tokens

        def get_next_token(self, probs):
            batch_size, vocab_size = keras.ops.shape(probs)
            for id in self.forbidden_tokens:
                update = keras.ops.zeros((batch_size, 1))
                probs = keras.ops.slice_update(probs, (0, id), update)
            return keras.ops.argmax(probs, axis=-1)

    return CustomSampler


def test_keras_hub_custom_sampler_gives_the_same_text(keras_hub_pair):
    _, ours = keras_hub_pair
    ours.compile(sampler="greedy")
    prompts = ours.preprocessor.generate_preprocess(["hello"], sequence_length=24)
    greedy = ours.generate(prompts, stop_token_ids=None)
    generated = greedy["token_ids"][0][~np.asarray(prompts["padding_mask"][0], bool)]
    forbidden = sorted(set(generated.tolist()))[:2]
    samplers, keras_hub_samplers = _ours(), _keras_hub_samplers()
    ours.compile(sampler=_custom_sampler_class(samplers)(forbidden_tokens=forbidden))
    output = ours.generate(prompts, stop_token_ids=None)["token_ids"][0]
    assert not set(output[~np.asarray(prompts["padding_mask"][0], bool)]) & set(forbidden)
    expected, actual = generate_both(
        keras_hub_pair,
        lambda module: _custom_sampler_class(module)(forbidden_tokens=forbidden),
        stop_token_ids=None,
    )
    assert actual == expected
    # Another forbidden list is another sampler: not served the first one's compiled loop.
    ours.compile(sampler=_custom_sampler_class(samplers)(forbidden_tokens=[]))
    again = ours.generate(prompts, stop_token_ids=None)["token_ids"]
    np.testing.assert_array_equal(again, greedy["token_ids"])
