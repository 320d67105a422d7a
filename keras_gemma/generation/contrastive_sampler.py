"""Contrastive search: likely tokens whose representation does not repeat the context."""

import keras
from keras import ops

from keras_gemma.generation.sampler import Sampler
from keras_gemma.generation.sampler import place_token


@keras.saving.register_keras_serializable(package="keras_gemma")
class ContrastiveSampler(Sampler):
    """Contrastive search (Su et al., 2022): among the `k` most likely next tokens, picks the
    one with the best `(1 - alpha) * probability - alpha * degeneration penalty`.

    A candidate's degeneration penalty is the largest cosine similarity between the final
    hidden state the model gives the candidate and the hidden states of every earlier
    position, prompt included; a token that would make the model "say the same thing again"
    scores low, which curbs the loops greedy search falls into. `alpha=0` is greedy search.
    The search is deterministic (no seed).

    How it runs: at each step the decode loop gives the sampler the logits and the hidden
    state of the last position, and a function that runs tokens through the model. The
    sampler runs its `k` candidates as `batch * k` rows, one step each, on copies of the KV
    caches (the copies are dropped: the next step runs the chosen token on the row's own
    caches, which is also what writes its hidden state to the history). Each step therefore
    costs one ordinary step plus `k` rows without the vocabulary projection. The hidden
    states seen so far are the loop's sampler state, float32 [batch, length, hidden_dim].
    This works inside every compiled loop (JAX's and TensorFlow's whole-loop programs,
    PyTorch's traced step); with JAX and 16-bit weights on a CPU, a step of several rows
    runs as one program rather than block by block (`layerwise_step.py`), so it needs more
    memory there.

    Args:
        k: how many of the most likely tokens are candidates.
        alpha: the weight of the degeneration penalty, in [0, 1].
        temperature: logits are divided by it before the candidates' probabilities are taken.
        seed: accepted for symmetry with the other samplers and ignored.

    Example:
    >>> lm.compile(sampler=ContrastiveSampler(k=4, alpha=0.6))   # or "contrastive"
    >>> lm.generate("The history of the bicycle", max_length=64)
    """

    uses_randomness = False
    needs_hidden_states = True

    def __init__(self, k=5, alpha=0.6, temperature=1.0, seed=None):
        super().__init__(temperature=temperature, seed=None)
        if k < 1:
            raise ValueError(f"k must be at least 1; got {k}.")
        if not 0 <= alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1]; got {alpha}.")
        self.k = int(k)
        self.alpha = float(alpha)

    def initial_state(self, batch_size, hidden_states=None):
        if hidden_states is None:
            raise ValueError("ContrastiveSampler needs the prompt's hidden states.")
        return ops.cast(hidden_states, "float32")

    def select(self, *arguments, **keywords):
        raise TypeError(
            "ContrastiveSampler picks tokens with select_with_hidden(); the decode loop "
            "calls it for samplers with needs_hidden_states."
        )

    def select_with_hidden(self, logits, hidden, run, tokens, caches, index, prompt_mask,
                           done, history, key, stop_ids, pad_id):
        """Chooses the token at `index` (see `Sampler.select` for the shared arguments).

        Args:
            logits: float32 [batch, vocabulary], the prediction for position `index`.
            hidden: [batch, hidden_dim], the final hidden state of position `index - 1`.
            run: `run(token_ids [rows, 1], caches, position) -> (hidden [rows, 1, hidden_dim],
                caches)`, the model's cached forward step.
            history: float32 [batch, length, hidden_dim], hidden states of the positions
                before `index - 1` (the loop's sampler state).

        Returns:
            `(tokens, caches, done, history)`.
        """
        if len(history.shape) != 3:
            # A decode loop that carries per-row scores instead (the SavedModel export's).
            raise ValueError(
                "ContrastiveSampler needs a decode loop that carries the hidden states "
                "(keras_gemma's Generator); this one does not. Use another sampler here."
            )
        history = ops.slice_update(
            history, [0, index - 1, 0], ops.expand_dims(ops.cast(hidden, "float32"), 1)
        )
        k = min(self.k, logits.shape[-1])
        probabilities, candidates = ops.top_k(self.compute_probabilities(logits), k=k)
        candidates = ops.cast(candidates, "int32")
        # Row r's candidates are rows r * k ... r * k + k - 1, each on a copy of r's caches.
        candidate_caches = [ops.repeat(cache, k, axis=0) for cache in caches]
        candidate_hidden, _ = run(ops.reshape(candidates, (-1, 1)), candidate_caches, index)
        candidate_hidden = ops.reshape(
            ops.cast(candidate_hidden, "float32"), (-1, k, history.shape[-1])
        )
        penalty = ops.max(_cosine_to_seen(candidate_hidden, history, index), axis=-1)
        score = (1.0 - self.alpha) * probabilities - self.alpha * penalty
        # Among equal scores the lowest token id, as greedy's argmax picks among equal
        # logits (16-bit logits tie often); top_k's order of tied candidates is arbitrary.
        best = ops.equal(score, ops.max(score, axis=-1, keepdims=True))
        token = ops.min(ops.where(best, candidates, logits.shape[-1]), axis=-1)
        tokens, done = place_token(token, tokens, index, prompt_mask, done, stop_ids, pad_id)
        return tokens, caches, done, history

    def get_config(self):
        return {"k": self.k, "alpha": self.alpha, "temperature": self.temperature}


def _cosine_to_seen(candidates, history, index):
    """Cosine similarity [batch, k, length] of each candidate [batch, k, hidden] to each
    position of `history` [batch, length, hidden]; -1 (the least similar) from `index` on,
    where the history holds nothing yet."""
    dots = ops.einsum("bkh,blh->bkl", candidates, history)
    candidate_norms = ops.sqrt(ops.sum(ops.square(candidates), axis=-1))
    history_norms = ops.sqrt(ops.sum(ops.square(history), axis=-1))
    # The floor only keeps the empty (zero) positions from dividing 0 by 0: they are masked.
    norms = ops.maximum(candidate_norms[:, :, None] * history_norms[:, None, :], 1e-30)
    seen = ops.arange(history.shape[1], dtype="int32")[None, None, :] < index
    return ops.where(seen, dots / norms, -1.0)
