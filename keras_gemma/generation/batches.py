"""Token batches for generate(): normalizing inputs and stripping prompts."""

import numpy as np
from keras import ops


def as_token_batch(inputs, max_length):
    """`{"token_ids": int32 [batch, width], "padding_mask": bool}` numpy arrays from a dict of
    tensors or arrays (a single row gets a batch axis); `max_length` pads or cuts the width."""
    if not isinstance(inputs, dict) or not {"token_ids", "padding_mask"} <= set(inputs):
        raise TypeError(
            "Without a preprocessor, generate() takes a dict with 'token_ids' and "
            f"'padding_mask'; got {type(inputs).__name__}."
        )
    token_ids = np.asarray(ops.convert_to_numpy(inputs["token_ids"])).astype("int32")
    padding_mask = np.asarray(ops.convert_to_numpy(inputs["padding_mask"])).astype(bool)
    if token_ids.ndim == 1:
        token_ids, padding_mask = token_ids[None], padding_mask[None]
    if token_ids.shape != padding_mask.shape and padding_mask.ndim == token_ids.ndim:
        try:  # one mask row for every prompt row, as numpy broadcasts it
            padding_mask = np.broadcast_to(padding_mask, token_ids.shape)
        except ValueError:
            pass
    if token_ids.shape != padding_mask.shape:
        raise ValueError(
            f"generate(): token_ids has shape {token_ids.shape} and padding_mask "
            f"{padding_mask.shape}; they must be the same (or the mask one row for all; it marks each row's prompt)."
        )
    if max_length is not None and max_length != token_ids.shape[1]:
        width = token_ids.shape[1]
        if max_length < width:
            token_ids, padding_mask = token_ids[:, :max_length], padding_mask[:, :max_length]
        else:
            pad = ((0, 0), (0, max_length - width))
            token_ids, padding_mask = np.pad(token_ids, pad), np.pad(padding_mask, pad)
    return {"token_ids": token_ids, "padding_mask": padding_mask}


def strip_prompt(token_ids, padding_mask, prompt_mask):
    """Moves each row's continuation to the front (KerasHub's `strip_prompt`)."""
    width = token_ids.shape[1]
    lengths = prompt_mask.sum(axis=1)
    positions = (np.arange(width)[None, :] + lengths[:, None]) % width
    generated = padding_mask & ~prompt_mask
    return (
        np.take_along_axis(token_ids, positions, axis=1),
        np.take_along_axis(generated, positions, axis=1),
    )
