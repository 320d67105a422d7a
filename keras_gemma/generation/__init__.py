"""Samplers and the compiled decode loop behind `GemmaCausalLM.generate()`."""

import keras

from keras_gemma.generation.beam_sampler import BeamSampler
from keras_gemma.generation.greedy_sampler import GreedySampler
from keras_gemma.generation.random_sampler import RandomSampler
from keras_gemma.generation.sampler import Sampler
from keras_gemma.generation.top_k_sampler import TopKSampler
from keras_gemma.generation.top_p_sampler import TopPSampler

_BY_NAME = {
    "greedy": GreedySampler,
    "top_k": TopKSampler,
    "top_p": TopPSampler,
    "random": RandomSampler,
    "beam": BeamSampler,
}


def get_sampler(identifier):
    """A sampler from a name ("greedy", "top_k", "top_p", "random", "beam"), a serialized
    config, or a sampler object (returned as is).

    Example:
    >>> get_sampler("top_k")
    TopKSampler(k=5, temperature=1.0, seed=None)
    """
    if isinstance(identifier, Sampler):
        return identifier
    if isinstance(identifier, str):
        if identifier not in _BY_NAME:
            raise ValueError(
                f"Unknown sampler {identifier!r}; expected one of {sorted(_BY_NAME)} or a "
                "keras_gemma.generation.Sampler."
            )
        return _BY_NAME[identifier]()
    if isinstance(identifier, dict):
        return keras.saving.deserialize_keras_object(identifier)
    raise TypeError(f"Cannot make a sampler from {identifier!r}.")


def serialize_sampler(sampler):
    """The sampler as a config dict that `get_sampler` reads back."""
    return keras.saving.serialize_keras_object(sampler)
