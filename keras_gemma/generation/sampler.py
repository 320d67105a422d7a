"""The base class of the samplers that pick each generated token."""

import threading

import keras
import numpy as np
from keras import ops

_CALL_COUNT_LOCK = threading.Lock()


def write_column(tokens, index, column):
    """`tokens[:, index] = column` for a [batch, length] tensor and a dynamic `index`."""
    return ops.slice_update(tokens, [0, index], ops.expand_dims(column, 1))


def read_column(tokens, index):
    """`tokens[:, index]` for a dynamic `index`."""
    if keras.backend.backend() == "torch":
        import torch

        if isinstance(tokens, torch.Tensor) and isinstance(index, torch.Tensor):
            # Keras' torch `slice` reads a tensor start on the host (`narrow`): a sync on a
            # GPU, and a value the compiled decode step cannot trace (torch_compiled_step.py).
            return torch.index_select(tokens, 1, index.reshape(1))[:, 0]
    return ops.squeeze(ops.slice(tokens, [0, index], [ops.shape(tokens)[0], 1]), 1)


def is_stop_token(token, stop_token_ids):
    """Whether each entry of `token` is one of the (static) `stop_token_ids`."""
    hit = ops.zeros_like(token, dtype="bool")
    for stop in stop_token_ids or ():
        hit = ops.logical_or(hit, ops.equal(token, stop))
    return hit


def place_token(token, tokens, index, prompt_mask, done, stop_ids, pad_id):
    """Writes the chosen `token` [batch] into column `index` of `tokens`, except where a row
    is still reading its prompt (the prompt token stays) or has stopped (`<pad>` goes
    there); marks rows that produced a stop token. Returns `(tokens, done)`."""
    token = ops.cast(token, "int32")
    forced = read_column(prompt_mask, index)
    token = ops.where(forced, read_column(tokens, index), token)
    token = ops.where(done, ops.cast(pad_id, "int32"), token)
    done = ops.logical_or(
        done, ops.logical_and(ops.logical_not(forced), is_stop_token(token, stop_ids))
    )
    return write_column(tokens, index, token), done


@keras.saving.register_keras_serializable(package="keras_gemma")
class Sampler:
    """Picks the next token from the logits at each decode step.

    A subclass implements `next_token(logits, key, step)`, or, as in KerasHub,
    `get_next_token(probabilities)` (then `probabilities` is
    `softmax(logits / temperature)` in float32). The decode loop calls `select`, which keeps
    prompt tokens where a row's prompt is still running, writes `<pad>` after a row has
    stopped, and marks rows that produced a stop token. Randomness comes from
    `keras_gemma.generation.random_bits`, a pure function of a per-call key, so a seeded
    sampler reproduces its sequence of outputs on every backend and inside compiled loops;
    a custom `get_next_token` must therefore be deterministic (a `keras.random` seed
    generator is state that the compiled loops do not carry).

    Samplers that need the model's hidden states (contrastive search) set
    `needs_hidden_states = True` and implement `select_with_hidden`; the decode loop then
    gives them the hidden state of each position and a function that runs candidate tokens
    through the model (see `ContrastiveSampler`).

    Args:
        temperature: logits are divided by it before sampling (ignored by greedy search).
        seed: int or None. With a seed, the n-th `generate()` call draws with key
            `(seed, n)`, so a fresh sampler with the same seed repeats the same outputs.

    Example:
    >>> class NoTokenFive(Sampler):   # KerasHub's way: greedy search with a token forbidden
    ...     def get_next_token(self, probabilities):
    ...         forbidden = ops.zeros((ops.shape(probabilities)[0], 1))
    ...         return ops.argmax(ops.slice_update(probabilities, (0, 5), forbidden), axis=-1)
    >>> lm.compile(sampler=NoTokenFive())
    """

    num_beams = 1
    uses_randomness = True
    needs_hidden_states = False

    def __init__(self, temperature=1.0, seed=None):
        if temperature <= 0:
            raise ValueError(f"temperature must be positive; got {temperature}.")
        self.temperature = float(temperature)
        self.seed = seed
        self._calls = 0

    def next_token(self, logits, key, step):
        """int32 [batch] tokens from float32 `logits` [batch, vocabulary]."""
        return self.get_next_token(self.compute_probabilities(logits))

    def get_next_token(self, probabilities):
        """KerasHub's hook: the next token [batch] from `probabilities` [batch, vocabulary]."""
        raise NotImplementedError(
            f"{type(self).__name__} must implement next_token(logits, key, step) or "
            "get_next_token(probabilities)."
        )

    def compute_probabilities(self, logits):
        """`softmax(logits / temperature)` in float32."""
        return ops.softmax(self.scaled(logits), axis=-1)

    def new_key(self):
        """The int32 [2] key for one `generate()` call (host side)."""
        if not self.uses_randomness:
            return np.zeros((2,), "int32")
        if self.seed is None:
            return np.random.randint(-(2**31), 2**31 - 1, size=(2,), dtype=np.int64).astype(
                "int32"
            )
        with _CALL_COUNT_LOCK:  # threads generating at once each get a key of their own
            calls = self._calls
            self._calls += 1
        key = np.array([self.seed & 0xFFFFFFFF, calls & 0xFFFFFFFF], dtype=np.uint32)
        return key.view(np.int32)

    def scaled(self, logits):
        return ops.cast(logits, "float32") / self.temperature

    def initial_scores(self, batch_size):
        """Per-row state the loop carries for the sampler (beam scores); zeros otherwise."""
        return ops.zeros((batch_size,), "float32")

    def initial_state(self, batch_size, hidden_states=None):
        """The state the decode loop carries for the sampler (passed to `select` as
        `scores`). `hidden_states` is given to samplers with `needs_hidden_states`: float32
        [batch, length, hidden_dim], the prompt's final hidden states (zeros past them)."""
        return self.initial_scores(batch_size)

    def select(self, logits, tokens, caches, index, prompt_mask, done, scores, key, stop_ids,
               pad_id):
        """One decode step's bookkeeping: writes column `index` of `tokens`.

        Args:
            logits: float32 [batch, vocabulary], the prediction for position `index`.
            tokens: int32 [batch, length]; prompts, then what was generated so far.
            caches: the per-layer KV caches (reordered only by beam search).
            index: int32 scalar, the position being generated.
            prompt_mask: bool [batch, length], True on each row's prompt.
            done: bool [batch], rows that already produced a stop token.
            scores: the sampler's state (beam search's log-probabilities).
            key: int32 [2], this call's random key.
            stop_ids: tuple of ints (static).
            pad_id: the id written after a row has stopped.

        Returns:
            `(tokens, caches, done, scores)`.
        """
        token = self.next_token(logits, key, index)
        tokens, done = place_token(token, tokens, index, prompt_mask, done, stop_ids, pad_id)
        return tokens, caches, done, scores

    def finalize(self, tokens, done, scores):
        """The rows to return (beam search keeps the best beam of each row)."""
        return tokens, done

    def get_config(self):
        return {"temperature": self.temperature, "seed": self.seed}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        arguments = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({arguments})"
