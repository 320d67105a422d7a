"""One garbage collection for a batch of Keras variable removals, instead of one per variable.

Keras' `Layer.__delattr__` runs a full `gc.collect()` every time a layer drops a variable
(so that the device buffer goes at once), and `quantize` and LoRA merging drop one or two
per dense layer. A full collection walks every live Python object: in a process that has
imported JAX, TensorFlow or transformers that is ~1M objects and 0.3-1 s each time, so
quantizing a 2B model (126 dense layers) or merging its LoRA spent more time collecting
garbage than quantizing (measured in this repo's test suite: 25 of 29 s for one int8 LoRA
merge of a tiny model, 99 s of the JAX suite's 764 s).

`one_collection()` freezes the objects that exist when it starts (Python's `gc.freeze`), so
the collections inside it only look at objects made since, then unfreezes and collects once.
"""

import contextlib
import gc


@contextlib.contextmanager
def one_collection():
    """Runs the body with cheap garbage collections, then collects everything once.

    Example:
    >>> with one_collection():
    ...     lm.quantize("int8")
    """
    if gc.get_freeze_count():
        # Someone (a server warming up, say) froze objects on purpose: leave theirs alone.
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.collect()
