"""Gemma's RMS normalization."""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_gemma")
class RMSNormalization(keras.layers.Layer):
    """Root-mean-square normalization with a zero-centred scale, computed in float32.

    Gemma stores the scale as `w` and multiplies by `1 + w`, so a freshly built layer is the
    identity scale. The statistics are taken in float32 whatever the compute dtype: in
    bfloat16 the mean of squares of a 2048-wide vector loses enough precision to move logits.

    Args:
        epsilon: added to the mean square before the reciprocal square root.

    Example:
    >>> norm = RMSNormalization(epsilon=1e-6)
    >>> norm(keras.ops.ones((2, 3, 8))).shape
    (2, 3, 8)
    """

    def __init__(self, epsilon=1e-6, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = epsilon

    def build(self, input_shape):
        self.scale = self.add_weight(
            name="scale", shape=(input_shape[-1],), initializer="zeros"
        )
        self.built = True

    def call(self, inputs):
        x = ops.cast(inputs, "float32")
        variance = ops.mean(ops.square(x), axis=-1, keepdims=True)
        x = x * ops.rsqrt(variance + self.epsilon)
        x = x * (1.0 + ops.cast(self.scale, "float32"))
        return ops.cast(x, self.compute_dtype)

    def get_config(self):
        config = super().get_config()
        config.update({"epsilon": self.epsilon})
        return config
