"""A decode step of several rows as one jitted call per decoder block (JAX, 16-bit weights)."""

import keras
from keras import ops

from keras_gemma.generation.layerwise_prefill import LayerwisePrefill


class LayerwiseStep:
    """The Generator's decode step, cut into jitted pieces: embedding, each block, then the
    final norm, logits and sampler together.

    With more than one row, XLA's CPU dot converts a bfloat16 weight to float32 before the
    product, and in a one-program step it keeps every block's float32 copy alive together
    (gemma_2b_en, 8 rows: 16 GB peak for 5 GB of weights). One block per call bounds the
    copies to one block's. One row keeps the one-program step: its products read the
    bfloat16 weights directly.

    Example:
    >>> step = LayerwiseStep(lm, finish=lambda hidden, *state: ...)
    >>> tokens, caches, done, scores = step(tokens, caches, index, prompt_mask, done, scores, key)
    """

    def __init__(self, model, finish, counted=lambda function: function):
        """`finish(hidden, tokens, caches, index, prompt_mask, done, scores, key)` turns the
        last block's output [rows, 1, hidden_dim] into `(tokens, caches, done, scores)`."""
        self.model = model
        self._blocks = LayerwisePrefill(model, counted)
        self._finish = finish
        self._counted = counted
        self._finish_program = None
        self._finish_variables = None

    def __call__(self, tokens, caches, index, prompt_mask, done, scores, key, kernels=None):
        """`kernels`: per decoder block, its int4 kernels dequantized for this call
        (int4_decode_kernels.py), or None."""
        import jax

        rows = tokens.shape[0]
        token = ops.slice(tokens, [0, index - 1], [rows, 1])
        x = self._blocks.embed(token)
        updated = []
        blocks = self.model.backbone.transformer_layers
        for number, (block, cache) in enumerate(zip(blocks, caches)):
            block_kernels = None if kernels is None else kernels[number]
            x, cache = self._blocks.run_block(block, x, cache, index - 1, block_kernels)
            updated.append(cache)
        if self._finish_program is None:
            # Listed once: the Generator makes new steps when the model's weights change.
            variables = self._finish_variables = self._list_finish_variables()

            def finish(weights, *arguments):
                with keras.StatelessScope(state_mapping=list(zip(variables, weights))):
                    return self._finish(*arguments)

            self._finish_program = jax.jit(self._counted(finish))
        weights = [variable.value for variable in self._finish_variables]
        return self._finish_program(
            weights, x, tokens, updated, index, prompt_mask, done, scores, key
        )

    def _list_finish_variables(self):
        backbone = self.model.backbone
        return list(backbone.final_normalization.weights) + list(backbone.token_embedding.weights)
