"""`gelu_tanh(gate) * up`, the feed-forward's gate, keeping only its two inputs for backward.

Autodiff of `gelu(gate) * up` keeps four tensors of the feed-forward's width per layer until
the backward pass: `gate`, `up`, the tanh inside the GELU and `gelu(gate)`. Only `gate` and
`up` are needed; the other two are cheap elementwise functions of `gate`. On JAX this
product is a `jax.custom_vjp` whose backward pass recomputes them from `gate` (the
recomputation is tied to the incoming gradient, so XLA can neither share it with the forward
pass's values nor run it early). In XLA's buffer assignment of a gemma_2b_en int8 + LoRA
training step (128 tokens, float32 activations; benchmarks/finetune.py's setting), the
tanh and the GELU of all 18 layers were live at the step's peak: 36 tensors of 8.4 MB,
0.30 GB, which this removes (with the tied logits' fix in sixteen_bit_product.py the step's
temporaries went from 1.37 to 0.95 GB). The extra work is a tanh over 128 x 16384 values a
layer, against two 2048 x 16384 products. The numbers are those of autodiff of the same
expression.

On TensorFlow and PyTorch the plain expression runs.
"""

import functools

import keras

from keras_gemma.layers.sixteen_bit_product import zero_after


def gated_gelu(gate, up):
    """`keras.activations.gelu(gate, approximate=True) * up`.

    Example:
    >>> gate, up = keras.ops.ones((1, 3, 8)), keras.ops.ones((1, 3, 8))
    >>> gated_gelu(gate, up).shape
    (1, 3, 8)
    """
    if keras.backend.backend() != "jax":
        return _gated(gate, up)
    return _jax_gated_gelu()(gate, up)


def _gated(gate, up):
    return keras.activations.gelu(gate, approximate=True) * up


@functools.lru_cache(maxsize=None)
def _jax_gated_gelu():
    import jax

    @jax.custom_vjp
    def product(gate, up):
        return _gated(gate, up)

    def forward(gate, up):
        return _gated(gate, up), (gate, up)

    def backward(residuals, gradient):
        gate, up = residuals
        # Recomputed after the gradient exists: without the tie, XLA would merge this with
        # the forward pass's tanh and keep that one alive instead.
        gate = gate + zero_after(gradient, gate.dtype)
        _, pullback = jax.vjp(_gated, gate, up)
        return pullback(gradient)

    product.defvjp(forward, backward)
    return product
