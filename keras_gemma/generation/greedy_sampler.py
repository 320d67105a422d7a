"""Greedy search: always the most likely token."""

import keras
from keras import ops

from keras_gemma.generation.sampler import Sampler


@keras.saving.register_keras_serializable(package="keras_gemma")
class GreedySampler(Sampler):
    """Picks the highest-scoring token at every step (deterministic; no temperature).

    Ties go to the lowest token id, as `argmax` does in transformers.

    Example:
    >>> lm.compile(sampler=GreedySampler())      # or sampler="greedy"
    >>> lm.generate("The capital of France is", max_length=16)
    """

    uses_randomness = False

    def __init__(self, temperature=1.0, seed=None):
        super().__init__(temperature=1.0, seed=None)
        # Kept for the config only (KerasHub's lists it): the argmax does not depend on it.
        self.temperature = float(temperature)

    def next_token(self, logits, key, step):
        return ops.argmax(logits, axis=-1)

    def get_config(self):
        return {"temperature": self.temperature}
