"""`get_config()` without importing TensorFlow into a JAX or PyTorch process.

Keras' serializer asks `tensorflow.available` (which imports TensorFlow when it is
installed) to check whether a config value is a `tf.TensorShape`, `tf.DType` or
`tf.TypeSpec`. Quantizing while loading builds each float scratch layer from its layer's
config, so a JAX or PyTorch process that had never touched TensorFlow imported all of it:
+0.48 GB of peak RSS on the gemma_2b_en int8 + LoRA step (5.04 GB against a 5 GB target).
While TensorFlow is not imported no value can be one of its objects, so the check is
answered "not available" for the duration of the call and left as it was afterwards.
"""

import contextlib
import sys


@contextlib.contextmanager
def tensorflow_unimported():
    """While TensorFlow is not imported, Keras' serializer does not import it either."""
    try:
        from keras.src.utils import module_utils

        lazy = module_utils.tensorflow
    except (ImportError, AttributeError):  # another Keras: serialize as it does
        yield
        return
    if "tensorflow" in sys.modules or getattr(lazy, "_available", True) is not None:
        yield
        return
    lazy._available = False
    try:
        yield
    finally:
        lazy._available = None


def config_of(layer):
    """`layer.get_config()`, without importing TensorFlow where it is not imported yet.

    Example:
    >>> config_of(keras.layers.Dense(4))["units"]
    4
    """
    with tensorflow_unimported():
        return layer.get_config()
