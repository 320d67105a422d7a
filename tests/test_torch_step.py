"""torch_step.current_values reads what `Variable.value` would, scopes included."""

import keras
import numpy as np
import pytest
from conftest import BACKEND

pytestmark = pytest.mark.skipif(BACKEND != "torch", reason="the traced step is torch's")


def test_current_values_are_the_variables_values_in_and_out_of_scopes():
    from keras_gemma.generation.torch_step import current_values

    layer = keras.layers.Dense(3, dtype="float32")
    layer.build((None, 2))
    variables = layer.trainable_variables
    outside = current_values(variables)
    assert all(a is v.value for a, v in zip(outside, variables))
    replacements = [keras.ops.ones(v.shape) for v in variables]
    with keras.StatelessScope(state_mapping=list(zip(variables, replacements))):
        inside = current_values(variables)
    assert all(a is b for a, b in zip(inside, replacements))
    from keras.src.backend.common.variables import AutocastScope

    with AutocastScope("bfloat16"):
        cast = current_values(variables)
    assert all(str(a.dtype) == "torch.bfloat16" for a in cast)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(keras.ops.cast(cast[0], "float32")),
        keras.ops.convert_to_numpy(variables[0]),
        atol=1e-2,
    )
