"""Skipping random initialization when weights are about to be overwritten.

Building a 2B model draws 2.5 billion random numbers, seconds of work and a transient copy
per variable, only for a checkpoint to replace them. Loaders build inside
`skip_random_initialization()`, where the layers ask for zeros instead.
"""

from keras_gemma.layers.thread_flag import ThreadFlag

_skip = ThreadFlag()


def skip_random_initialization():
    """Inside this context, keras_gemma layers initialize their weights to zeros.

    Example:
    >>> with skip_random_initialization():
    ...     backbone = GemmaBackbone(**config)   # fast; weights are all zero
    >>> load_weights(backbone, directory)
    """
    return _skip.raised()


def initializer(default):
    """`default`, or "zeros" inside `skip_random_initialization()`."""
    return "zeros" if _skip.is_raised() else default
