"""Samplers and the compiled decode loop behind `GemmaCausalLM.generate()`."""

from keras_gemma.generation.beam_sampler import BeamSampler
from keras_gemma.generation.contrastive_sampler import ContrastiveSampler
from keras_gemma.generation.greedy_sampler import GreedySampler
from keras_gemma.generation.random_sampler import RandomSampler
from keras_gemma.generation.sampler import Sampler
from keras_gemma.generation.sampler_names import BY_NAME as _BY_NAME
from keras_gemma.generation.sampler_names import get as _get
from keras_gemma.generation.sampler_names import serialize as _serialize
from keras_gemma.generation.top_k_sampler import TopKSampler
from keras_gemma.generation.top_p_sampler import TopPSampler


def get_sampler(identifier):
    """A sampler from a name ("greedy", "top_k", "top_p", "random", "beam", "contrastive"),
    a serialized config (ours or KerasHub's), or a sampler object (returned as is).

    `keras_gemma.samplers.get` is the same with KerasHub's edge cases (None gives None).

    Example:
    >>> get_sampler("top_k")
    TopKSampler(k=5, temperature=1.0, seed=None)
    """
    if identifier is None:
        raise TypeError("Cannot make a sampler from None; pass a name such as 'greedy'.")
    if isinstance(identifier, str) and identifier.lower() in _BY_NAME:
        identifier = identifier.lower()
    try:
        return _get(identifier)
    except ValueError as error:
        if isinstance(identifier, (str, dict)):
            raise
        raise TypeError(f"Cannot make a sampler from {identifier!r}.") from error


def serialize_sampler(sampler):
    """The sampler as a config dict that `get_sampler` reads back."""
    return _serialize(sampler)
