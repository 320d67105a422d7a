"""The PyTorch decode step: a traced graph over a fixed-shape KV cache.

Why tracing, measured on this repository's 2-core CPU machine (float32, 1 torch thread,
batch 1, per decode step; see the issue note for the full table):

    model                          eager Keras   torch.compile (inductor)   torch.jit.trace
    tiny (3 layers, hidden 32)     12.6 ms       1.2 ms, 30-67 s compile    1.4 ms, 0.3 s trace
    mid (8 layers, hidden 1024)    114 ms        no faster, 95-200 s        same as eager, 2.6 s

A small model's eager step is all Keras' per-layer Python overhead; a big model's step is
memory-bound matrix-vector products that no compiler speeds up. `torch.compile` removes
the overhead but takes minutes to trace Keras' Python and generate C++ for every shape
bucket, and `torch.export`'s module runs slower than eager. `torch.jit.trace` records the
aten ops in one eager run and replays them without Python, so it wins at every size.

The model weights are traced as inputs (read through a `keras.StatelessScope`), so
fine-tuning, LoRA and quantization are seen by the graph. `jit.trace` is deprecated in
torch 2.13; if it is missing or fails, the step runs eagerly.
Set `KERAS_GEMMA_TORCH_TRACE=0` to always decode eagerly.
"""

import os
import warnings

import keras
from keras import tree


def tracing_enabled():
    return os.environ.get("KERAS_GEMMA_TORCH_TRACE", "1") not in ("0", "false", "False")


class TracedStep:
    """Calls `function(*arguments)` through a `torch.jit.trace` of it made on the first call.

    `arguments` and the result may be nested lists/tuples of tensors; their shapes must not
    change between calls (the caller keys one `TracedStep` per shape bucket).

    Example:
    >>> step = TracedStep(body, model)
    >>> tokens, caches, done, scores = step(tokens, caches, index, mask, done, scores, key)
    """

    def __init__(self, function, model):
        self.function = function
        self.model = model
        self._traced = None
        self._failed = not tracing_enabled()
        self._output_structure = None

    def _variables(self):
        return self.model.trainable_variables + self.model.non_trainable_variables

    def __call__(self, *arguments):
        if self._failed:
            return self.function(*arguments)
        variables = self._variables()
        values = [v.value for v in variables]
        flat = tree.flatten(arguments)
        if self._traced is None:
            self._trace(variables, values, arguments, flat)
            if self._failed:
                return self.function(*arguments)
        outputs = self._traced(*values, *flat)
        return tree.pack_sequence_as(self._output_structure, list(outputs))

    def _trace(self, variables, values, arguments, flat):
        import torch

        count = len(variables)

        def flat_function(*inputs):
            weights, rest = inputs[:count], inputs[count:]
            with keras.StatelessScope(state_mapping=list(zip(variables, weights))):
                outputs = self.function(*tree.pack_sequence_as(arguments, list(rest)))
            self._output_structure = outputs
            return tuple(tree.flatten(outputs))

        try:
            with warnings.catch_warnings():
                # Shape-to-int conversions are fine: shapes are fixed per TracedStep.
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                warnings.simplefilter("ignore", DeprecationWarning)
                self._traced = torch.jit.trace(
                    flat_function, tuple(values) + tuple(flat), check_trace=False
                )
        except Exception as error:  # an op that cannot be traced: decode eagerly instead
            warnings.warn(f"torch.jit.trace of the decode step failed ({error}); decoding eagerly.")
            self._failed = True
