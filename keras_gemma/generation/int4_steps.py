"""The Generator's int4 pieces for JAX on a CPU: kernels dequantized once per call, and the
steps and prefill that read them (the measurements: layers/int4_decode_kernels.py).

Example:
>>> prepare = kernels_function(lm, rows=1)   # None unless int4 decodes this way
>>> kernels = prepare()                      # per decoder block, its int4 kernels
>>> step = step_reading_kernels(step, lm.backbone, compile)
>>> outputs = with_kernels(step, kernels, tokens, caches, index, mask, done, scores, key)
"""

from keras_gemma.generation.loop_parts import jax_stateless_jit
from keras_gemma.layers import int4_decode_kernels


def kernels_function(model, rows):
    """A jitted function of no arguments giving, per decoder block, the kernels of its int4
    projections for steps of `rows` rows; None where int4_decode_kernels does not apply."""
    backbone = model.backbone
    if not int4_decode_kernels.applies(backbone):
        return None
    blocks = [int4_decode_kernels.eligible_layers(block) for block in backbone.transformer_layers]
    dtype = int4_decode_kernels.kernel_dtype(rows)
    return jax_stateless_jit(model, lambda: [
        [int4_decode_kernels.dequantized(layer, dtype) for layer in layers] for layers in blocks
    ])


def step_reading_kernels(step, backbone, compile):
    """`compile`d `step`, called as `step(*arguments, kernels=...)`: while it is traced, the
    int4 projections read the kernels passed in."""
    layers = [layer for block in backbone.transformer_layers
              for layer in int4_decode_kernels.eligible_layers(block)]

    def step_with_kernels(kernels, *arguments):
        flat = [kernel for block_kernels in kernels for kernel in block_kernels]
        with int4_decode_kernels.provided(layers, flat):
            return step(*arguments)

    compiled = compile(step_with_kernels)
    return lambda *arguments, kernels: compiled(kernels, *arguments)


def with_kernels(function, kernels, *arguments):
    """`function(*arguments)`, handed the call's int4 kernels where there are some."""
    if kernels is None:
        return function(*arguments)
    return function(*arguments, kernels=kernels)
