"""What the tokenizer and the preprocessor take in and give out, eagerly and in tf graphs.

Inputs may be Python strings and lists, numpy arrays, or any backend's tensors; the eager
engine reads them all into Python / numpy. Whether a tf.data or tf.function graph is tracing
us decides which engine runs. TensorFlow is never imported here: if it was not imported
already, no graph can be tracing us.

Example:
```python
strings, single = as_strings(np.array(["a", "b"]))   # (["a", "b"], False)
ids = to_python(keras.ops.convert_to_tensor([1, 2]))  # a numpy array
tensor = to_backend(np.zeros((2, 3), "int32"))       # a jax / tf / torch tensor
```
"""

import sys

import keras
import numpy as np


def tf_module():
    """TensorFlow, imported on first need (it takes seconds and may be absent)."""
    import tensorflow as tf

    return tf


def in_tf_graph():
    """Whether a tf.function or tf.data graph is tracing the caller."""
    tf = sys.modules.get("tensorflow")
    return hasattr(tf, "executing_eagerly") and not tf.executing_eagerly()


def is_tf_tensor(x):
    tf = sys.modules.get("tensorflow")
    return hasattr(tf, "RaggedTensor") and isinstance(x, (tf.Tensor, tf.RaggedTensor))


def to_python(x):
    """Eager tensors of any framework as numpy arrays (or nested lists for tf ragged)."""
    if is_tf_tensor(x):
        return x.to_list() if hasattr(x, "to_list") else x.numpy()
    if keras.ops.is_tensor(x):
        return keras.ops.convert_to_numpy(x)
    return x


def to_backend(array):
    """A numpy array as a tensor of the Keras backend, as KerasHub's preprocessors return:
    so that `ops.ones_like(ids)` and a model call on it mix no numpy with tensors."""
    return keras.ops.convert_to_tensor(array, dtype=str(array.dtype))


def is_int(v):
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _as_str(x, index=0):
    if isinstance(x, bytes):
        try:
            return x.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(
                f"GemmaTokenizer.tokenize: string {index} is bytes that are not valid UTF-8 "
                f"({e}). Decode it yourself, e.g. data.decode('utf-8', 'replace')."
            ) from None
    if isinstance(x, str):
        try:
            x.encode("utf-8")
        except UnicodeEncodeError as e:
            # A lone surrogate (half of a UTF-16 pair, or a byte kept by
            # errors="surrogateescape") is no character: SentencePiece cannot take it.
            raise ValueError(
                f"GemmaTokenizer.tokenize: string {index} holds the lone surrogate "
                f"{x[e.start]!r} at position {e.start}, which is not a character and has no "
                "UTF-8 form. Clean the text first, e.g. "
                "text.encode('utf-8', 'replace').decode('utf-8')."
            ) from None
        return x
    raise TypeError(
        "GemmaTokenizer.tokenize expects a string or a 1-D batch of strings. "
        f"Received: {type(x).__name__} ({x!r:.60})."
    )


def as_strings(inputs):
    """(list of str, whether the input was a single string) for the eager engine."""
    if isinstance(inputs, np.ndarray):
        if inputs.dtype.kind not in "USO":
            raise TypeError(
                f"GemmaTokenizer.tokenize expects strings. Received a numpy array of {inputs.dtype}"
            )
        inputs = inputs.tolist()
    if isinstance(inputs, (list, tuple)):
        return [_as_str(x, index) for index, x in enumerate(inputs)], False
    return [_as_str(inputs)], True
