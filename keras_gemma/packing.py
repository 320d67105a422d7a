"""Packing short training examples into full rows, each example attending only to itself.

Fine-tuning data is mostly short (an instruction and its answer); padding each example to
`sequence_length` spends most of a step on padding. Packing puts several examples in one row
and marks which is which in the `padding_mask` the backbone already takes: 0 is padding, k is
the row's k-th example (segment ids). The backbone then lets a token attend only to earlier
tokens of its own example and restarts the rotary positions at each example, so a packed
example's logits are the logits it has alone (tests/test_packing.py checks the losses).
A mask of only 0 and 1 is an ordinary padding mask and behaves exactly as before.

Example:
```python
ids, segments, trained = pack_rows(ids, mask, trained)   # from right-padded examples
# ids [[2, 5, 6, 1, 2, 7, 1, 0]], segments [[1, 1, 1, 1, 2, 2, 2, 0]]
preprocessor = keras_gemma.GemmaCausalLMPreprocessor(tokenizer, sequence_length=256,
                                                     packing=True)
lm.preprocessor = preprocessor
lm.fit({"prompts": prompts, "responses": responses}, batch_size=4)   # fewer, fuller rows
```
"""

import numpy as np


def pack_rows(ids, mask, trained):
    """Right-padded examples -> packed rows of the same length: (ids, segments, trained).

    Args:
        ids: int [examples, length], each row an example followed by padding.
        mask: bool [examples, length], True on the example's tokens (a prefix of the row).
        trained: bool [examples, length], True where the token is a label of the loss.

    Examples are placed first-fit, in their order: each goes into the first row with room
    for it, else a new row. An example never spans two rows. Padding keeps the ids of the
    input's padding and segment 0.
    """
    ids = np.asarray(ids)
    mask = np.asarray(mask).astype(bool)
    trained = np.asarray(trained).astype(bool)
    if ids.ndim != 2 or mask.shape != ids.shape or trained.shape != ids.shape:
        raise ValueError(
            "pack_rows expects ids, mask and trained of one shape [examples, length]; got "
            f"{ids.shape}, {mask.shape} and {trained.shape}."
        )
    lengths = mask.sum(axis=1)
    if not np.array_equal(mask, np.arange(ids.shape[1]) < lengths[:, None]):
        raise ValueError("pack_rows expects right-padded examples (mask True, then False).")
    length = ids.shape[1]
    pad_id = ids[~mask][0] if (~mask).any() else 0
    rows = []  # each: [used, [example indices]]
    for example, size in enumerate(lengths):
        if size == 0:
            continue
        for row in rows:
            if row[0] + size <= length:
                row[0] += size
                row[1].append(example)
                break
        else:
            rows.append([size, [example]])
    packed_ids = np.full((len(rows), length), pad_id, dtype=ids.dtype)
    segments = np.zeros((len(rows), length), dtype="int32")
    packed_trained = np.zeros((len(rows), length), dtype=bool)
    for r, (_, members) in enumerate(rows):
        at = 0
        for k, example in enumerate(members, start=1):
            size = lengths[example]
            packed_ids[r, at : at + size] = ids[example, :size]
            segments[r, at : at + size] = k
            packed_trained[r, at : at + size] = trained[example, :size]
            at += size
    return packed_ids, segments, packed_trained


def shifted_weights(segments, trained):
    """Sample weights of the labels `ids[:, 1:]`: trained, and the same example as the input
    token before it (the last token of one example does not predict the next example)."""
    same = np.equal(segments[..., 1:], segments[..., :-1]) & (segments[..., 1:] > 0)
    return trained[..., 1:] & same
