"""Ancestral sampling from the whole (temperature-scaled) distribution."""

import keras
from keras import ops

from keras_gemma.generation import random_bits
from keras_gemma.generation.sampler import Sampler


@keras.saving.register_keras_serializable(package="keras_gemma")
class RandomSampler(Sampler):
    """Samples the next token from `softmax(logits / temperature)` over the whole vocabulary.

    Args:
        seed: int for reproducible outputs, None for fresh randomness each call.
        temperature: above 1 flattens the distribution, below 1 sharpens it.

    The seed comes first, as in KerasHub (`RandomSampler(42)` is `seed=42`).

    Example:
    >>> lm.compile(sampler=RandomSampler(temperature=0.8, seed=42))
    >>> lm.generate("Once upon a time", max_length=32)
    """

    def __init__(self, seed=None, temperature=1.0):
        super().__init__(temperature=temperature, seed=seed)

    def next_token(self, logits, key, step):
        # Gumbel-max: argmax(logits + Gumbel noise) is a sample of softmax(logits).
        scaled = self.scaled(logits)
        noise = random_bits.gumbel(key, step, (ops.shape(scaled)[0], scaled.shape[-1]))
        return ops.argmax(scaled + noise, axis=-1)
