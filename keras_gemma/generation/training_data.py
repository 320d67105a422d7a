"""Applying a causal-LM preprocessor to the data given to `fit`, `evaluate` and `predict`."""

import keras
import numpy as np

from keras_gemma.training_examples import is_chat_data


def _is_string_data(x):
    if isinstance(x, (str, bytes)):
        return True
    if isinstance(x, np.ndarray):
        return x.dtype.kind in "USO"
    if isinstance(x, (list, tuple)):
        return len(x) > 0 and all(isinstance(v, (str, bytes)) for v in x)
    dtype = getattr(x, "dtype", None)
    return dtype is not None and "string" in str(dtype)


def _string_list(value):
    if isinstance(value, np.ndarray):
        return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in value.tolist()]
    return value


def _is_structured_data(x):
    """`{"prompts", "responses"}` of strings, or chat conversations (lists of role dicts)."""
    if isinstance(x, dict):
        return "prompts" in x and _is_string_data(x["prompts"])
    return is_chat_data(x)


def _is_tf_dataset(x):
    return type(x).__name__.endswith("Dataset") and hasattr(x, "element_spec")


def _dataset_has_strings(dataset):
    import tensorflow as tf

    specs = tf.nest.flatten(dataset.element_spec)
    return any(getattr(spec, "dtype", None) == tf.string for spec in specs)


def preprocess_for_training(preprocessor, x, y, sample_weight, batch_size):
    """`(x, y, sample_weight, batch_size)` with string data turned into model inputs.

    Strings (a str, a list of str, a string array) are packed eagerly by the preprocessor
    into `x = {"token_ids", "padding_mask"}`, next-token labels `y` and a `sample_weight`
    that masks padding, as KerasHub's tasks do. A `tf.data.Dataset` of strings gets the
    preprocessor mapped over it (the first element of each tuple is the text). Anything
    else (already tokenized dicts, arrays, datasets of ids) passes through unchanged.
    """
    if preprocessor is None:
        return x, y, sample_weight, batch_size
    if _is_tf_dataset(x):
        if not _dataset_has_strings(x):
            return x, y, sample_weight, batch_size
        import tensorflow as tf

        def apply(*element):
            # Labels come from the text itself; a (text, label) element drops the label.
            return preprocessor(element[0])

        return x.map(apply, num_parallel_calls=tf.data.AUTOTUNE), None, None, None
    if _is_structured_data(x):
        if isinstance(x, dict):
            x = {key: _string_list(value) for key, value in x.items()}
        packed = keras.tree.map_structure(keras.ops.convert_to_numpy, preprocessor(x))
        features, labels, weights = packed
        return features, labels, weights, batch_size
    if _is_string_data(x):
        if isinstance(x, (str, bytes)):
            x = [x]
        if isinstance(x, np.ndarray):
            x = [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in x.tolist()]
        # The preprocessor answers backend tensors (as KerasHub's does); `fit` gets numpy,
        # which Keras batches on the host whatever the backend and device.
        packed = keras.tree.map_structure(keras.ops.convert_to_numpy, preprocessor(list(x)))
        features, labels, weights = packed
        return features, labels, weights, batch_size
    return x, y, sample_weight, batch_size
