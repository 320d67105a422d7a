"""Top-k sampling."""

import keras
from keras import ops

from keras_gemma.generation import random_bits
from keras_gemma.generation.sampler import Sampler


@keras.saving.register_keras_serializable(package="keras_gemma")
class TopKSampler(Sampler):
    """Samples among the `k` most likely tokens, in proportion to their probabilities.

    `k=1` is greedy search.

    Args:
        k: how many of the best tokens stay candidates.
        seed: int for reproducible outputs, None for fresh randomness each call.
        temperature: logits are divided by it before sampling.

    The arguments come in KerasHub's order, so `TopKSampler(5, 42)` is `k=5, seed=42` there
    and here.

    Example:
    >>> lm.compile(sampler=TopKSampler(k=10, temperature=0.7, seed=0))   # or "top_k"
    >>> lm.generate("Keras is", max_length=32)
    """

    def __init__(self, k=5, seed=None, temperature=1.0):
        super().__init__(temperature=temperature, seed=seed)
        if k < 1:
            raise ValueError(f"k must be at least 1; got {k}.")
        self.k = int(k)

    def next_token(self, logits, key, step):
        scaled = self.scaled(logits)
        k = min(self.k, scaled.shape[-1])
        # Exactly k candidates even when values tie (a threshold on the k-th value would not).
        values, indices = ops.top_k(scaled, k=k, sorted=True)
        noise = random_bits.gumbel(key, step, (ops.shape(scaled)[0], k))
        choice = ops.argmax(values + noise, axis=-1)
        return ops.squeeze(ops.take_along_axis(indices, choice[:, None], axis=-1), -1)

    def get_config(self):
        return {"k": self.k, **super().get_config()}
