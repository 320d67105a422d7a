"""one_row_product: a one-row product written as a multiply and a sum (torch only).

Only while a step is recorded for Inductor, only for one row of a row-major kernel; the
operator the recording runs (in blocks of kernel rows) and the multiply-and-sum form
Inductor compiles equal numpy's product of the same numbers (float32, bfloat16 and int8
with per-row scales). Its speed and its place in the compiled step: test_torch_compiled_step.py.
"""

import numpy as np
import pytest
from conftest import BACKEND

pytestmark = pytest.mark.skipif(BACKEND != "torch", reason="a PyTorch product")


def test_applies_to_one_row_while_recording_only():
    import torch

    from keras_gemma.layers import inductor_recording, one_row_product

    kernel = torch.ones(6, 4)
    assert not one_row_product.applies(torch.ones(1, 4), kernel)
    with inductor_recording.on():
        assert one_row_product.applies(torch.ones(1, 4), kernel)
        assert not one_row_product.applies(torch.ones(2, 4), kernel)
        assert not one_row_product.applies(torch.ones(1, 4), kernel.t().contiguous().t())
    assert not one_row_product.applies(torch.ones(1, 4), kernel)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_product_equals_numpy(dtype, monkeypatch):
    import torch

    from keras_gemma.layers import one_row_product

    rng = np.random.default_rng(0)
    rows = rng.normal(size=(1, 48)).astype("float32")
    if dtype == "int8":
        kernel = torch.tensor(rng.integers(-127, 128, size=(40, 48)), dtype=torch.int8)
        scale = torch.tensor(rng.uniform(0.01, 0.1, size=40), dtype=torch.float32)
    else:
        kernel = torch.tensor(rng.normal(size=(40, 48)), dtype=getattr(torch, dtype))
        scale = None
    expected = rows.astype("float64") @ kernel.to(torch.float64).numpy().T
    if scale is not None:
        expected = expected * scale.numpy()
    monkeypatch.setattr(one_row_product, "EAGER_BLOCK_ROWS", 16)  # 40 rows: blocks of 16
    # The operator as recorded (run eagerly, in blocks of rows) and the form Inductor gets.
    for form in (one_row_product.product, one_row_product.as_reduction):
        got = form(torch.tensor(rows), kernel, scale)
        assert got.dtype == torch.float32 and tuple(got.shape) == (1, 40)
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_inductor_takes_the_reduction_form():
    import torch

    from keras_gemma.layers import one_row_product

    (operator,) = one_row_product.decompositions()
    assert operator is torch.ops.keras_gemma.one_row_product.default
