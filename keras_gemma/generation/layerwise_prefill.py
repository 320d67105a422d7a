"""Prefill one decoder block per jitted call, for JAX with 16-bit or integer weights on CPU."""

import json

import keras
from keras import ops

from keras_gemma.layers import int4_decode_kernels


class LayerwisePrefill:
    """Fills the KV caches for a prompt by running each decoder block as its own jax.jit call.

    XLA's CPU dot has no bfloat16 kernel: a prompt-length product converts its weight to
    float32 first, and in one program for the whole model XLA keeps those float32 copies of
    every block alive together (gemma_2b_en in bfloat16: 5.3 GB of weights, 12.7 GB while the
    prefill ran). One block per call bounds the copies to one block's (~0.4 GB at 2B). Blocks
    with the same configuration share one compiled program; the weights are its arguments.

    Example:
    >>> prefill = LayerwisePrefill(lm)
    >>> caches = prefill(tokens, caches, prefill_length=16)
    """

    def __init__(self, model, counted=lambda function: function):
        self.model = model
        self._counted = counted  # wraps traced functions so that the Generator counts traces
        self._programs = {}  # by block configuration
        self._block_programs = {}  # by block, once its configuration was looked up
        self._embed = None

    def __call__(self, tokens, caches, prefill_length, kernels=None):
        """`kernels`: per decoder block, its int4 kernels dequantized for this call
        (int4_decode_kernels.py), or None."""
        return self._run(tokens, caches, prefill_length, kernels)[0]

    def with_hidden(self, tokens, caches, prefill_length, kernels=None):
        """`(caches, hidden)`: also the final (normalized) hidden states [batch,
        prefill_length, hidden_dim] of the prompt, which contrastive search compares its
        candidates with; None when `prefill_length` is 0."""
        caches, x = self._run(tokens, caches, prefill_length, kernels)
        if x is None:
            return caches, None
        # One normalization of the prompt's activations: run as it is, not compiled.
        return caches, self.model.backbone.final_normalization(x)

    def _run(self, tokens, caches, prefill_length, kernels):
        if not prefill_length:
            return caches, None
        x = self.embed(tokens[:, :prefill_length])
        updated = []
        blocks = self.model.backbone.transformer_layers
        for index, (block, cache) in enumerate(zip(blocks, caches)):
            block_kernels = None if kernels is None else kernels[index]
            x, cache = self.run_block(block, x, cache, 0, block_kernels)
            updated.append(cache)
        return updated, x

    def embed(self, token_ids):
        """The scaled token embeddings of `token_ids` [batch, length], in one jitted call."""
        import jax

        backbone = self.model.backbone
        if self._embed is None:
            embedding = backbone.token_embedding

            def embed(weights, token_ids):
                with keras.StatelessScope(state_mapping=list(zip(embedding.weights, weights))):
                    x = embedding(token_ids)
                    return x * ops.cast(backbone.hidden_dim**0.5, x.dtype)

            self._embed = jax.jit(self._counted(embed))
        return self._embed(_values(backbone.token_embedding), token_ids)

    def run_block(self, block, x, cache, cache_update_index, kernels=None):
        """`block(x, cache=cache, cache_update_index=...)` as one jitted call; `kernels`
        the block's int4 kernels for this call (int4_decode_kernels.py), or None."""
        index = ops.convert_to_tensor(cache_update_index, "int32")
        return self._program(block)(_values(block), kernels or [], x, cache, index)

    def _program(self, block):
        # Looked up by block first: the decode loop calls this for every block at every step.
        program = self._block_programs.get(id(block))
        if program is not None:
            return program
        import jax

        config = {k: v for k, v in block.get_config().items() if k != "name"}
        # Blocks of one configuration may still hold different variables: GPTQ keeps the
        # first and last blocks int8 where the others are int4.
        variables = [(tuple(v.shape), str(v.dtype)) for v in block.weights]
        key = json.dumps([config, variables], sort_keys=True, default=str)
        program = self._programs.get(key)
        if program is None:

            def run(weights, kernels, x, cache, cache_update_index):
                # `block` stands for every block of this configuration: its variables are
                # mapped to the weights passed in, its int4 layers to the kernels passed in.
                layers = int4_decode_kernels.eligible_layers(block) if kernels else []
                with keras.StatelessScope(state_mapping=list(zip(block.weights, weights))):
                    with int4_decode_kernels.provided(layers, kernels):
                        return block(x, cache=cache, cache_update_index=cache_update_index)

            program = self._programs[key] = jax.jit(self._counted(run))
        self._block_programs[id(block)] = program
        return program


def _values(layer):
    return [variable.value for variable in layer.weights]
