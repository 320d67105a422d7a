"""Beam search."""

import keras
from keras import ops

from keras_gemma.generation.sampler import Sampler
from keras_gemma.generation.sampler import is_stop_token
from keras_gemma.generation.sampler import read_column
from keras_gemma.generation.sampler import write_column

# A beam that must not be chosen (finite, so sums with log-probabilities stay ordered).
_EXCLUDED = -1e9


@keras.saving.register_keras_serializable(package="keras_gemma")
class BeamSampler(Sampler):
    """Keeps the `num_beams` most likely continuations and returns the best one.

    Beams are scored by their summed log-probability (no length penalty). A beam that
    produces a stop token is finished: it keeps its score and is padded from then on, so
    it competes with the beams still running. The decode loop runs `num_beams` rows per
    prompt and reorders the KV caches by beam at every step.

    Args:
        num_beams: beams kept per prompt; 1 is greedy search.
        return_all_beams: KerasHub's argument. Only False (the best beam) works through
            `generate()`, which returns one sequence per prompt; True is accepted here and
            refused by `generate()` with an error, because KerasHub's `generate()` fails on
            it too (its sampler then returns a (sequences, scores) pair that the rest of
            `generate()` cannot handle).
        temperature: logits are divided by it before the log-probabilities are taken.

    Example:
    >>> lm.compile(sampler=BeamSampler(num_beams=4))      # or "beam"
    >>> lm.generate("Translate to French: cheese =>", max_length=24)
    """

    uses_randomness = False

    def __init__(self, num_beams=5, return_all_beams=False, temperature=1.0, **kwargs):
        kwargs.pop("seed", None)
        super().__init__(temperature=temperature, **kwargs)
        if num_beams < 1:
            raise ValueError(f"num_beams must be at least 1; got {num_beams}.")
        self.num_beams = int(num_beams)
        self.return_all_beams = bool(return_all_beams)

    def initial_scores(self, batch_size):
        # All beams of a prompt start identical; only the first may be extended at the first
        # free step, or the same continuation would fill every beam.
        first = ops.equal(ops.arange(batch_size) % self.num_beams, 0)
        return ops.where(first, 0.0, _EXCLUDED)

    def select(self, logits, tokens, caches, index, prompt_mask, done, scores, key, stop_ids,
               pad_id):
        rows, vocabulary = logits.shape
        beams = self.num_beams
        prompts = rows // beams
        log_probs = ops.log_softmax(self.scaled(logits), axis=-1)
        # A finished beam can only continue with <pad>, at no cost.
        is_pad = ops.equal(ops.arange(vocabulary), pad_id)
        finished = ops.where(is_pad, 0.0, _EXCLUDED)
        log_probs = ops.where(done[:, None], finished[None, :], log_probs)
        # candidates[prompt, beam * vocabulary + token]
        candidates = ops.reshape(scores[:, None] + log_probs, (prompts, beams * vocabulary))
        best_scores, best = ops.top_k(candidates, k=beams, sorted=True)
        source_beam = best // vocabulary
        token = ops.reshape(ops.cast(best % vocabulary, "int32"), (rows,))

        # While a prompt is still being read, its beams stay as they are.
        forced = read_column(prompt_mask, index)
        forced_prompt = ops.reshape(forced, (prompts, beams))[:, 0]
        same_beam = ops.broadcast_to(ops.arange(beams)[None, :], (prompts, beams))
        source_beam = ops.where(forced_prompt[:, None], same_beam, source_beam)
        best_scores = ops.where(forced_prompt[:, None], ops.reshape(scores, (prompts, beams)),
                                best_scores)
        source_row = ops.reshape(
            ops.arange(prompts)[:, None] * beams + source_beam, (rows,)
        )
        tokens = ops.take(tokens, source_row, axis=0)
        done = ops.take(done, source_row, axis=0)
        caches = [ops.take(cache, source_row, axis=0) for cache in caches]

        token = ops.where(forced, read_column(tokens, index), token)
        token = ops.where(done, ops.cast(pad_id, "int32"), token)
        done = ops.logical_or(
            done, ops.logical_and(ops.logical_not(forced), is_stop_token(token, stop_ids))
        )
        scores = ops.reshape(best_scores, (rows,))
        return write_column(tokens, index, token), caches, done, scores

    def finalize(self, tokens, done, scores):
        rows = tokens.shape[0]
        beams = self.num_beams
        best = ops.argmax(ops.reshape(scores, (rows // beams, beams)), axis=-1)
        chosen = ops.arange(rows // beams) * beams + ops.cast(best, "int32")
        return ops.take(tokens, chosen, axis=0), ops.take(done, chosen, axis=0)

    def get_config(self):
        return {
            "num_beams": self.num_beams,
            "return_all_beams": self.return_all_beams,
            "temperature": self.temperature,
        }
