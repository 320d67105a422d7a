"""What `generate()` and `stream()` accept, turned into token batches, and their stop tokens."""

import numpy as np

from keras_gemma.generation import batches as token_batches


def unwrap_prompts(inputs):
    """KerasHub's Gemma 3 input `{"prompts": ..., "images": None}` as plain prompts.

    Any other input is returned as it is. keras_gemma is text only: images are refused.

    Example:
    >>> unwrap_prompts({"prompts": ["Hi"]})
    ['Hi']
    """
    if not isinstance(inputs, dict) or "prompts" not in inputs:
        return inputs
    extra = sorted(key for key, value in inputs.items() if key != "prompts" and value is not None)
    if extra:
        raise ValueError(
            f"generate(): keras_gemma's Gemma models are text only; the input holds {extra} "
            'besides "prompts". Pass {"prompts": ...} alone (or the prompts themselves).'
        )
    return inputs["prompts"]


def stop_token_ids(preprocessor, stop_token_ids):
    """The stop ids of `generate(stop_token_ids=...)`: "auto", None or a sequence of ids."""
    if isinstance(stop_token_ids, str) and stop_token_ids == "auto":
        if preprocessor is None:
            raise ValueError(
                'stop_token_ids="auto" needs a preprocessor (it stops at the tokenizer\'s '
                "<eos> and <end_of_turn>). Without one, pass stop_token_ids=None to "
                "generate until max_length, or a tuple of token ids."
            )
        tokenizer = preprocessor.tokenizer
        # Instruction-tuned Gemma ends its turn with <end_of_turn> rather than <eos>; a
        # vocabulary that has the piece gets both (as KerasHub's Gemma 3 does).
        ids = [tokenizer.end_token_id, getattr(tokenizer, "end_of_turn_id", None)]
        return tuple(int(i) for i in ids if i is not None)
    if stop_token_ids is None:
        return ()
    return tuple(sorted({int(i) for i in stop_token_ids}))


def generate_batches(preprocessor, inputs, max_length):
    """`(batches, single, is_dataset)`: the input as `{"token_ids", "padding_mask"}` dicts.

    `single` says the input was one string (so one string comes back); `is_dataset` that it
    was a tf.data.Dataset (generated batch by batch).
    """
    is_dataset = hasattr(inputs, "as_numpy_iterator")  # a tf.data.Dataset
    batches = inputs.as_numpy_iterator() if is_dataset else [inputs]
    single = False
    if preprocessor is None or isinstance(inputs, dict):
        # Token ids in, token ids out (also with a preprocessor attached).
        packed = [token_batches.as_token_batch(b, max_length) for b in batches]
        return packed, False, is_dataset
    if isinstance(inputs, (str, bytes)):
        single = True
        batches = [[inputs]]
    packed = []
    for batch in batches:
        if isinstance(batch, np.ndarray) and batch.dtype.kind in "SO":
            batch = [b.decode("utf-8") if isinstance(b, bytes) else b for b in batch.tolist()]
        packed.append(
            token_batches.as_token_batch(
                preprocessor.generate_preprocess(batch, sequence_length=max_length), None
            )
        )
    return packed, single, is_dataset
