"""Checks of what a caller passes to `generate()` and `stream()`, naming the argument.

Without them a bad argument surfaces from deeper down, under a name the caller never used:
`max_length=0` as an error about the preprocessor's `sequence_length`, an empty prompt list
as numpy's "zero-size array to reduction operation", `stop_token_ids="eos"` as
`int('e')`, and a token id past the vocabulary not at all (the embedding lookup clamps it).

Example:
>>> check_max_length(64, "generate()")
>>> check_max_length(0, "generate()")
Traceback (most recent call last):
ValueError: generate(): `max_length` must be an integer >= 2 ...
"""

import numpy as np

from keras_gemma.architecture_checks import is_integer


def check_max_length(max_length, caller):
    """`max_length` is None (the default length) or an integer >= 2."""
    if max_length is None:
        return
    # 2: the start token and one generated token; the preprocessor's own lower bound.
    if not is_integer(max_length) or max_length < 2:
        raise ValueError(
            f"{caller}: `max_length` must be an integer >= 2 (the total length in tokens, "
            f"prompt included), got {max_length!r}. Pass e.g. max_length=64, or leave it out "
            "to use the preprocessor's sequence_length."
        )


def check_prompts(inputs, caller):
    """Prompts for a model with a preprocessor: a string or a non-empty 1-D batch of them.

    Dicts (token ids, prompts/responses) and tf.data datasets are checked where they are read.
    """
    if isinstance(inputs, (str, bytes, dict)) or hasattr(inputs, "as_numpy_iterator"):
        return
    if isinstance(inputs, np.ndarray) and inputs.dtype.kind in "USO":
        inputs = inputs.tolist()
    if not isinstance(inputs, (list, tuple)):
        raise TypeError(
            f"{caller}: the prompt must be a string or a list of strings, got "
            f"{type(inputs).__name__} ({inputs!r:.60}). Pass e.g. \"Hello\" or [\"Hello\", "
            "\"Hi\"]."
        )
    if not inputs:
        raise ValueError(
            f"{caller}: got an empty list of prompts; pass at least one string (an empty "
            "string \"\" is a valid prompt)."
        )
    for index, prompt in enumerate(inputs):
        if not isinstance(prompt, (str, bytes)):
            raise TypeError(
                f"{caller}: prompt {index} of the batch is {type(prompt).__name__} "
                f"({prompt!r:.60}); every prompt in a batch must be a string. Convert it with "
                "str(), or pass token ids as {\"token_ids\": ..., \"padding_mask\": ...}."
            )


def check_stop_token_ids(stop_token_ids, vocabulary_size, caller):
    """"auto", None, or a sequence of token ids inside the vocabulary."""
    if stop_token_ids is None or (isinstance(stop_token_ids, str) and stop_token_ids == "auto"):
        return
    advice = ('Pass "auto" (the tokenizer\'s <eos> and <end_of_turn>), None (never stop '
              "early) or a list of token ids, e.g. [tokenizer.token_to_id(\"<eos>\")].")
    if isinstance(stop_token_ids, (str, bytes)) or not hasattr(stop_token_ids, "__iter__"):
        raise TypeError(f"{caller}: `stop_token_ids` got {stop_token_ids!r}. {advice}")
    for token in stop_token_ids:
        if not is_integer(token) or not 0 <= token < vocabulary_size:
            raise ValueError(
                f"{caller}: `stop_token_ids` holds {token!r}, which is not a token id of "
                f"this model (integers 0 to {vocabulary_size - 1}). {advice}"
            )


def check_token_batch(batch, vocabulary_size, caller):
    """`{"token_ids", "padding_mask"}` (of one shape: `batches.as_token_batch` checks) with
    every id inside the vocabulary."""
    ids = batch["token_ids"]
    if ids.size and (ids.min() < 0 or ids.max() >= vocabulary_size):
        bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
        raise ValueError(
            f"{caller}: token_ids holds {bad}, outside this model's vocabulary (ids 0 to "
            f"{vocabulary_size - 1}). Tokenize with this model's tokenizer."
        )
