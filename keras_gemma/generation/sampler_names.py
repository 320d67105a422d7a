"""Samplers by name and by config: `get`, `serialize` and `deserialize` (KerasHub's API)."""

import keras

from keras_gemma.generation.beam_sampler import BeamSampler
from keras_gemma.generation.contrastive_sampler import ContrastiveSampler
from keras_gemma.generation.greedy_sampler import GreedySampler
from keras_gemma.generation.random_sampler import RandomSampler
from keras_gemma.generation.sampler import Sampler
from keras_gemma.generation.top_k_sampler import TopKSampler
from keras_gemma.generation.top_p_sampler import TopPSampler

BY_NAME = {
    "greedy": GreedySampler,
    "top_k": TopKSampler,
    "top_p": TopPSampler,
    "random": RandomSampler,
    "beam": BeamSampler,
    "contrastive": ContrastiveSampler,
}
_BY_CLASS_NAME = {cls.__name__: cls for cls in BY_NAME.values()}


def serialize(sampler):
    """The sampler as a config dict (Keras' serialization format) that `deserialize` reads.

    Example:
    >>> serialize(TopKSampler(k=3))["config"]
    {'k': 3, 'temperature': 1.0, 'seed': None}
    """
    return keras.saving.serialize_keras_object(sampler)


def deserialize(config, custom_objects=None):
    """A sampler from a name ("greedy", "top_k", "top_p", "random", "beam", "contrastive") or
    a config dict. A config that KerasHub wrote (class name "keras_hub>TopKSampler" or
    "TopKSampler") makes the sampler of the same name here, from the same arguments.

    Example:
    >>> deserialize({"class_name": "keras_hub>GreedySampler", "config": {}})
    GreedySampler(temperature=1.0)
    """
    if isinstance(config, str):
        if config == "speculative":
            raise ValueError(
                "keras_gemma has no speculative sampler (KerasHub's SpeculativeSampler needs "
                f"a draft model); use one of {sorted(BY_NAME)}."
            )
        if config not in BY_NAME:
            raise ValueError(
                f"Unknown sampler {config!r}; expected one of {sorted(BY_NAME)} or a "
                "keras_gemma.samplers.Sampler."
            )
        return BY_NAME[config]()
    if not isinstance(config, dict):
        raise ValueError(f"Could not interpret sampler config: {config!r}.")
    cls = _our_class(config)
    if cls is not None:
        return cls.from_config(dict(config.get("config") or {}))
    # A user's sampler, registered with keras.saving.register_keras_serializable or passed
    # in custom_objects.
    return keras.saving.deserialize_keras_object(config, custom_objects=custom_objects)


def get(identifier):
    """A sampler from a name, a config dict, or a sampler (returned as it is); None is None.

    As in KerasHub, a name must be lowercase (KeyError otherwise). A `Sampler` subclass is
    instantiated with its defaults (KerasHub's documentation promises this; its code returns
    the class, which `generate()` cannot use).

    Example:
    >>> get("contrastive")
    ContrastiveSampler(k=5, alpha=0.6, temperature=1.0)
    >>> get({"class_name": "TopKSampler", "config": {"k": 2}})
    TopKSampler(k=2, temperature=1.0, seed=None)
    """
    if identifier is None:
        return None
    if isinstance(identifier, Sampler):
        return identifier
    if isinstance(identifier, type) and issubclass(identifier, Sampler):
        return identifier()
    if isinstance(identifier, dict):
        return deserialize(identifier)
    if isinstance(identifier, str):
        if not identifier.islower():
            raise KeyError(
                "keras_gemma.samplers.get() takes a lowercase name, as KerasHub's does; got "
                f"{identifier!r}."
            )
        return deserialize(identifier)
    raise ValueError(f"Could not interpret sampler identifier: {identifier!r}.")


def _our_class(config):
    """Our class for a config that names one of the built-in samplers (by its Keras
    registered name, KerasHub's or ours, or its bare class name), else None."""
    # The registered name first: a user's "my_package>TopKSampler" is not ours.
    name = config.get("registered_name") or config.get("class_name")
    if not isinstance(name, str):
        return None
    package, _, bare = name.rpartition(">")
    if package in ("", "keras_gemma", "keras_hub"):
        return _BY_CLASS_NAME.get(bare)
    return None
