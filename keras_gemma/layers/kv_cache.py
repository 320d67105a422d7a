"""Keys and values written into a preallocated KV cache [batch, 2, max_length, kv, head_dim]."""

import keras
from keras import ops

from keras_gemma.layers.thread_flag import ThreadFlag

# Per thread: one thread tracing its decode step must not make another thread's eager
# `call_with_cache` write into the cache its caller still holds.
_in_place = ThreadFlag()


def cache_writes_in_place():
    """Within this context the torch backend writes KV caches in place.

    For a caller that owns the caches it passes and keeps only the updated ones: the traced
    decode step (generation/torch_step.py). A cache rebuilt by `slice_update` is a copy of
    the whole cache per layer and token, and ~15 recorded ops. Elsewhere (and on JAX and
    TensorFlow, whose compiled `slice_update` already writes in place) caches are values:
    `call_with_cache` never changes the cache it is given.
    """
    return _in_place.raised()


def write_to_cache(cache, start_index, keys_and_values):
    """`cache` [batch, 2, max_length, kv_heads, head_dim] with `keys_and_values`
    [batch, 2, new, kv_heads, head_dim] written at positions `start_index, ...`.

    Example:
    >>> cache = write_to_cache(cache, index, ops.stack((key, value), axis=1))
    """
    if (
        _in_place.is_raised()
        and keras.backend.backend() == "torch"
        # A broadcast view cannot be written in place (its rows share memory): the
        # contrastive sampler's candidate caches, which Keras' torch `repeat` expands.
        and cache.is_contiguous()
    ):
        # The positions stay a tensor on the cache's device: the traced step keeps them a
        # runtime value, and nothing reads them on the host (`narrow` with a tensor start
        # did: a sync per layer on a GPU, and a value `make_fx` cannot trace for the
        # compiled step, torch_compiled_step.py).
        import torch

        positions = torch.arange(keys_and_values.shape[2], device=cache.device)
        positions = positions + torch.as_tensor(start_index, device=cache.device)
        cache.index_copy_(2, positions, keys_and_values)
        return cache
    return ops.slice_update(cache, [0, 0, start_index, 0, 0], keys_and_values)
