"""GPTQ of one matrix (keras_gemma/layers/gptq.py): its rounding on Keras' int4 grid, its
error feedback, and its refusals. numpy only, so the same on every backend."""

import numpy as np
import pytest

from keras_gemma.layers import gptq


def _dequantized(values, scale, zero, group_size):
    scale = np.repeat(scale, group_size, axis=0).T  # [out, in]
    zero = np.repeat(zero, group_size, axis=0).T
    return (values - zero) * scale


def _round_to_nearest(weights, group_size, symmetric=False):
    """Each group rounded on its own grid (the search of `gptq.grid`), no error feedback."""
    values = np.zeros(weights.shape, np.int8)
    groups = weights.shape[1] // group_size
    scales, zeros = np.zeros((groups, weights.shape[0])), np.zeros((groups, weights.shape[0]))
    for group in range(groups):
        part = weights[:, group * group_size:(group + 1) * group_size]
        scale, zero = gptq.grid(part, symmetric)
        values[:, group * group_size:(group + 1) * group_size] = np.clip(
            np.round(part / scale[:, None]) + zero[:, None], -8, 7
        )
        scales[group], zeros[group] = scale, zero
    return values, scales, zeros


def _correlated_inputs(rng, tokens, width):
    mixing = rng.standard_normal((width, width)) / np.sqrt(width)
    return rng.standard_normal((tokens, width)) @ mixing + 0.3 * rng.standard_normal((1, width))


def test_values_lie_on_keras_int4_grid():
    rng = np.random.default_rng(0)
    weights = rng.standard_normal((24, 64))
    inputs = _correlated_inputs(rng, 256, 64)
    values, scale, zero = gptq.gptq_int4(weights, inputs.T @ inputs / 256, group_size=16)
    assert values.dtype == np.int8 and values.min() >= -8 and values.max() <= 7
    assert scale.shape == zero.shape == (4, 24)
    assert np.all(zero == np.round(zero)) and zero.min() >= -8 and zero.max() <= 7
    # Every dequantized weight stays within its group's range plus half a step.
    dequantized = _dequantized(values, scale, zero, 16)
    assert np.isfinite(dequantized).all()


@pytest.mark.parametrize("activation_order", [False, True])
def test_uncorrelated_inputs_make_it_round_to_nearest(activation_order):
    # With H diagonal, the Cholesky factor of H^-1 is diagonal: no error reaches another
    # column, so GPTQ must equal plain rounding on the same grids, in any column order.
    rng = np.random.default_rng(1)
    weights = rng.standard_normal((16, 64))
    hessian = np.diag(rng.uniform(0.5, 2.0, 64))
    values, scale, zero = gptq.gptq_int4(weights, hessian, group_size=32, damping=0.0,
                                         activation_order=activation_order)
    expected_values, expected_scale, expected_zero = _round_to_nearest(weights, 32)
    np.testing.assert_array_equal(values, expected_values)
    np.testing.assert_allclose(scale, expected_scale, rtol=1e-6)
    np.testing.assert_array_equal(zero, expected_zero)


@pytest.mark.parametrize("symmetric, activation_order",
                         [(False, False), (True, False), (False, True)])
def test_output_error_below_round_to_nearest(symmetric, activation_order):
    # What GPTQ minimizes: the layer's output error on the calibration inputs.
    rng = np.random.default_rng(2)
    weights = rng.standard_normal((48, 256))
    inputs = _correlated_inputs(rng, 1024, 256)
    hessian = inputs.T @ inputs / len(inputs)
    values, scale, zero = gptq.gptq_int4(weights, hessian, group_size=32, symmetric=symmetric,
                                         activation_order=activation_order)
    ours = _dequantized(values, scale, zero, 32)
    if symmetric:
        assert not zero.any()
    plain = _dequantized(*_round_to_nearest(weights, 32, symmetric), 32)

    def output_error(quantized):
        return float(np.mean(np.square(inputs @ (weights - quantized).T)))

    print(f"output MSE: GPTQ {output_error(ours):.5f}, round to nearest {output_error(plain):.5f}")
    assert output_error(ours) < 0.7 * output_error(plain)


def test_unexercised_inputs_do_not_break_it():
    rng = np.random.default_rng(3)
    inputs = _correlated_inputs(rng, 128, 64)
    inputs[:, 5] = 0.0  # never active in calibration: H has a zero row and column
    values, scale, zero = gptq.gptq_int4(
        rng.standard_normal((8, 64)), inputs.T @ inputs / 128, group_size=32
    )
    assert np.isfinite(scale).all() and np.isfinite(zero).all()


def test_group_size_must_divide_the_inputs():
    with pytest.raises(ValueError, match="groups of 32 inputs do not divide this layer's 48"):
        gptq.gptq_int4(np.ones((4, 48)), np.eye(48), group_size=32)
