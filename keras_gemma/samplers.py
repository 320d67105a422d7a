"""KerasHub's `keras_hub.samplers` under the same names: code that builds or looks up a
sampler there runs here after changing the import.

Example:
>>> from keras_gemma import samplers
>>> lm.compile(sampler=samplers.ContrastiveSampler(k=4, alpha=0.6))
>>> samplers.get("top_k")
TopKSampler(k=5, temperature=1.0, seed=None)
>>> samplers.deserialize(samplers.serialize(samplers.BeamSampler(num_beams=2)))
BeamSampler(num_beams=2, return_all_beams=False, temperature=1.0)
"""

from keras_gemma.generation.beam_sampler import BeamSampler
from keras_gemma.generation.contrastive_sampler import ContrastiveSampler
from keras_gemma.generation.greedy_sampler import GreedySampler
from keras_gemma.generation.random_sampler import RandomSampler
from keras_gemma.generation.sampler import Sampler
from keras_gemma.generation.sampler_names import deserialize
from keras_gemma.generation.sampler_names import get
from keras_gemma.generation.sampler_names import serialize
from keras_gemma.generation.top_k_sampler import TopKSampler
from keras_gemma.generation.top_p_sampler import TopPSampler

__all__ = [
    "BeamSampler",
    "ContrastiveSampler",
    "GreedySampler",
    "RandomSampler",
    "Sampler",
    "TopKSampler",
    "TopPSampler",
    "deserialize",
    "get",
    "serialize",
]
