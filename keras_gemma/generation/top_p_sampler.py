"""Nucleus (top-p) sampling."""

import keras
from keras import ops

from keras_gemma.generation import random_bits
from keras_gemma.generation.sampler import Sampler


@keras.saving.register_keras_serializable(package="keras_gemma")
class TopPSampler(Sampler):
    """Samples among the most likely tokens whose probabilities first add up to `p`.

    The token that crosses `p` is kept, so at least one token is always a candidate.

    Args:
        p: the probability mass kept, in (0, 1]. The default, 0.1, is KerasHub's, so that
            `compile(sampler="top_p")` samples as it does there (nearly greedy; 0.9 is a
            common choice for varied text).
        k: optional cap on the candidates; sorting only the best `k` logits is much cheaper
            than sorting a 256,000-token vocabulary at every step.
        seed: int for reproducible outputs, None for fresh randomness each call.
        temperature: logits are divided by it before the probabilities are taken.

    Example:
    >>> lm.compile(sampler=TopPSampler(p=0.9, seed=1))    # or "top_p"
    >>> lm.generate("A haiku about rain:", max_length=48)
    """

    def __init__(self, p=0.1, k=None, seed=None, temperature=1.0):
        super().__init__(temperature=temperature, seed=seed)
        if not 0 < p <= 1:
            raise ValueError(f"p must be in (0, 1]; got {p}.")
        self.p = float(p)
        self.k = None if k is None else int(k)

    def next_token(self, logits, key, step):
        scaled = self.scaled(logits)
        vocabulary = scaled.shape[-1]
        k = vocabulary if self.k is None else min(self.k, vocabulary)
        values, indices = ops.top_k(scaled, k=k, sorted=True)
        # Probabilities over the whole vocabulary, not just the top k, so p means the same
        # with or without a cap.
        probabilities = ops.exp(values - ops.logsumexp(scaled, axis=-1, keepdims=True))
        mass_before = ops.cumsum(probabilities, axis=-1) - probabilities
        keep = ops.less(mass_before, self.p)
        noise = random_bits.gumbel(key, step, (ops.shape(scaled)[0], k))
        candidates = ops.where(keep, values + noise, float("-inf"))
        choice = ops.argmax(candidates, axis=-1)
        return ops.squeeze(ops.take_along_axis(indices, choice[:, None], axis=-1), -1)

    def get_config(self):
        return {"p": self.p, "k": self.k, **super().get_config()}
