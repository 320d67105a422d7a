"""The compiled prefill + decode loop behind `GemmaCausalLM.generate()` and `stream()`."""

import keras
import numpy as np
from keras import ops

from keras_gemma.generation.buckets import length_bucket
from keras_gemma.generation.buckets import prefill_bucket
from keras_gemma.generation.layerwise_prefill import LayerwisePrefill
from keras_gemma.generation.layerwise_step import LayerwiseStep
from keras_gemma.generation.sampler import is_stop_token
from keras_gemma.generation.torch_step import TracedStep
from keras_gemma.layers.decode_matmul import decode_matmul
from keras_gemma.layers.decode_matmul import xla_runs_on_cpu


class Generator:
    """Runs generation for a `GemmaCausalLM`, one compiled function per backend and shape.

    The prompt is prefilled in one call, then tokens are decoded one at a time from a
    preallocated KV cache. JAX runs prefill and the whole decode loop as one `jax.jit`
    program (`lax.while_loop`, model weights passed in as arguments through a
    `keras.StatelessScope`); TensorFlow as one `tf.function(jit_compile=True)`; PyTorch
    drives the loop from Python and replays each decode step as a `torch.jit.trace`d graph
    over a fixed-shape cache (`torch_step.py` has the measurements behind that choice), and
    so does JAX for bfloat16 weights, around a jitted step (`_steps_from_python`).

    Shapes are bucketed (`buckets.py`): the cache is as wide as `length_bucket(max_length)`,
    the prefill covers `prefill_bucket(shortest prompt)` positions, and the start position,
    `max_length` and the random key are runtime values, so a new prompt length or
    `max_length` inside known buckets does not compile again. `trace_count` counts traces.

    Example:
    >>> generator = Generator(lm)
    >>> ids, mask = generator.generate(token_ids, prompt_mask, sampler=GreedySampler())
    """

    def __init__(self, model):
        self.model = model
        self.trace_count = 0
        self.reset()

    def reset(self):
        """Forget compiled functions (after weights change structure: LoRA, quantization)."""
        self._functions = {}
        self._signature = None

    # Public entry points (numpy in, numpy out).

    def generate(self, token_ids, prompt_mask, sampler, stop_token_ids=(), pad_token_id=0):
        """Fills `token_ids` [batch, max_length] after each row's prompt (`prompt_mask`).

        Returns `(token_ids, padding_mask)` as numpy arrays of the input's shape; the mask
        covers the prompt and the generated tokens up to and including a stop token.
        """
        token_ids = np.asarray(token_ids, dtype="int32")
        prompt_mask = np.asarray(prompt_mask, dtype=bool)
        batch, max_length = token_ids.shape
        start = self._start(prompt_mask)
        if start >= max_length:
            return token_ids.copy(), prompt_mask.copy()
        tokens, mask, width = self._pad(token_ids, prompt_mask, sampler.num_beams, pad_token_id)
        prefill = prefill_bucket(start - 1, width)
        stop_ids = tuple(stop_token_ids)
        step_key = ("step", tokens.shape, _sampler_key(sampler), stop_ids, pad_token_id)
        key = ("generate", prefill) + step_key[1:]
        function = self._function(
            key, lambda: self._make_generate(prefill, sampler, stop_ids, pad_token_id, step_key)
        )
        arguments = (tokens, mask, np.int32(start), np.int32(max_length), sampler.new_key())
        with _no_grad():
            output, output_mask = function(*[ops.convert_to_tensor(a) for a in arguments])
        output = np.asarray(ops.convert_to_numpy(output))[:batch, :max_length]
        output_mask = np.asarray(ops.convert_to_numpy(output_mask))[:batch, :max_length]
        return output, output_mask

    def stream(self, token_ids, prompt_mask, sampler, stop_token_ids=(), pad_token_id=0):
        """Yields each generated token id of a single prompt as soon as it is chosen.

        A stop token ends the stream without being yielded.
        """
        if sampler.num_beams != 1:
            raise ValueError("Streaming needs a single-beam sampler (beam search decides late).")
        token_ids = np.asarray(token_ids, dtype="int32")
        prompt_mask = np.asarray(prompt_mask, dtype=bool)
        if token_ids.shape[0] != 1:
            raise ValueError("stream() generates for one prompt at a time.")
        max_length = token_ids.shape[1]
        start = self._start(prompt_mask)
        prompt_length = int(prompt_mask.sum())
        tokens, mask, width = self._pad(token_ids, prompt_mask, 1, pad_token_id)
        prefill = prefill_bucket(start - 1, width)
        stop_ids = tuple(stop_token_ids)
        prefill_fn = self._function(
            ("prefill", tokens.shape, prefill), lambda: self._make_prefill(prefill)
        )
        key = ("step", tokens.shape, _sampler_key(sampler), stop_ids, pad_token_id)
        step_fn = self._function(key, lambda: self._make_step(sampler, stop_ids, pad_token_id))
        random_key = ops.convert_to_tensor(sampler.new_key())
        # no_grad around each call, not the whole generator: the caller's code runs between
        # yields and must keep its own gradient mode.
        with _no_grad():
            tokens = ops.convert_to_tensor(tokens)
            mask = ops.convert_to_tensor(mask)
            caches = prefill_fn(tokens)
            done = ops.zeros((1,), "bool")
            scores = sampler.initial_scores(1)
        for index in range(start, max_length):
            index_tensor = ops.convert_to_tensor(np.int32(index))
            with _no_grad():
                tokens, caches, done, scores = step_fn(
                    tokens, caches, index_tensor, mask, done, scores, random_key
                )
            if index < prompt_length:
                continue
            token = int(ops.convert_to_numpy(tokens)[0, index])
            if token in stop_ids:
                return
            yield token

    # Building blocks (backend-agnostic; traced by jax.jit / tf.function).

    @staticmethod
    def _start(prompt_mask):
        # The first position any row generates; row lengths past it are read one token at a
        # time (a row keeps its prompt tokens), as in KerasHub. A row needs one token to
        # condition on.
        return max(1, int(prompt_mask.sum(axis=1).min()))

    @staticmethod
    def _pad(token_ids, prompt_mask, beams, pad_token_id):
        width = length_bucket(token_ids.shape[1])
        pad = ((0, 0), (0, width - token_ids.shape[1]))
        tokens = np.pad(token_ids, pad, constant_values=pad_token_id)
        mask = np.pad(prompt_mask, pad)
        if beams > 1:
            tokens, mask = np.repeat(tokens, beams, axis=0), np.repeat(mask, beams, axis=0)
        return tokens, mask, width

    def _empty_caches(self, batch, width):
        backbone = self.model.backbone
        shape = (batch, 2, width, backbone.num_key_value_heads, backbone.head_dim)
        return [ops.zeros(shape, backbone.compute_dtype) for _ in range(backbone.num_layers)]

    def _prefill(self, tokens, prefill):
        caches = self._empty_caches(tokens.shape[0], tokens.shape[1])
        if prefill:
            _, caches = self.model.hidden_with_cache(tokens[:, :prefill], caches, 0)
        return caches

    def _decode(self, token, caches, index):
        """float32 logits [batch, vocabulary] for `token` [batch, 1] at position `index`."""
        hidden, caches = self.model.hidden_with_cache(token, caches, index)
        return _tied_logits(self.model.backbone.token_embedding, hidden), caches

    def _body(self, decode, sampler, stop_ids, pad_id):
        def body(tokens, caches, index, prompt_mask, done, scores, key):
            batch = ops.shape(tokens)[0]  # dynamic in an exported SavedModel
            token = ops.slice(tokens, [0, index - 1], [batch, 1])
            logits, caches = decode(token, caches, index - 1)
            return sampler.select(
                logits, tokens, caches, index, prompt_mask, done, scores, key, stop_ids, pad_id
            )

        return body

    def _make_prefill(self, prefill):
        if keras.backend.backend() == "jax" and self._steps_from_python():
            layerwise = LayerwisePrefill(self.model, self._counted)

            def run(tokens):
                caches = self._empty_caches(tokens.shape[0], tokens.shape[1])
                return layerwise(tokens, caches, prefill)

            return run
        return self._compile(lambda tokens: self._prefill(tokens, prefill), xla=False)

    def _make_step(self, sampler, stop_ids, pad_id, rows=1):
        step = self._body(self._decode, sampler, stop_ids, pad_id)
        if keras.backend.backend() == "torch":
            return TracedStep(self._counted(step), self.model)
        if rows > 1 and keras.backend.backend() == "jax" and self._steps_from_python():
            backbone = self.model.backbone

            def finish(hidden, tokens, caches, index, prompt_mask, done, scores, key):
                hidden = backbone.final_normalization(hidden)
                logits = _tied_logits(backbone.token_embedding, hidden)
                return sampler.select(
                    logits, tokens, caches, index, prompt_mask, done, scores, key, stop_ids,
                    pad_id,
                )

            return LayerwiseStep(self.model, finish, self._counted)
        return self._compile(step, xla=False)

    def _make_generate(self, prefill, sampler, stop_ids, pad_id, step_key):
        if self._steps_from_python():
            return self._make_stepwise_generate(prefill, sampler, stop_ids, pad_id, step_key)
        body = self._body(self._decode, sampler, stop_ids, pad_id)

        def run(tokens, prompt_mask, start, max_length, key):
            caches = self._prefill(tokens, prefill)
            rows = tokens.shape[0]
            done = ops.zeros((rows,), "bool")
            scores = sampler.initial_scores(rows)

            def cond(tokens, caches, index, done, scores):
                return ops.logical_and(
                    ops.less(index, max_length), ops.logical_not(ops.all(done))
                )

            def loop_body(tokens, caches, index, done, scores):
                tokens, caches, done, scores = body(
                    tokens, caches, index, prompt_mask, done, scores, key
                )
                return tokens, caches, index + 1, done, scores

            tokens, _, end, done, scores = ops.while_loop(
                cond, loop_body, (tokens, caches, start, done, scores),
                maximum_iterations=tokens.shape[1],
            )
            tokens, done = sampler.finalize(tokens, done, scores)
            prompt = prompt_mask[:: sampler.num_beams]
            return tokens, _output_mask(tokens, prompt, end, stop_ids)

        return self._compile(run)

    def _steps_from_python(self):
        """Whether the decode loop runs in Python around a compiled step.

        torch: always (see torch_step.py). JAX: when the weights are 16-bit and XLA runs on
        the CPU (an accelerator has bfloat16 dots, and one compiled loop). XLA's CPU dot
        has no bfloat16 kernel: it converts each weight to float32 on the fly, and the
        whole-loop program (prefill + `lax.while_loop`) held float32 copies of the weights
        at once (gemma_2b_en in bfloat16 ran out of 24 GB; presumably the loop-invariant
        conversions are hoisted out of the loop). A step compiled on its own converts within
        each product, and the memory stays at the bfloat16 size; the prefill
        runs block by block for the same reason (`layerwise_prefill.py`), and so does a
        step of several rows (`layerwise_step.py`).
        """
        backend = keras.backend.backend()
        if backend == "torch":
            return True
        dtype = keras.backend.standardize_dtype(self.model.backbone.compute_dtype)
        return backend == "jax" and dtype in ("bfloat16", "float16") and xla_runs_on_cpu()

    def _make_stepwise_generate(self, prefill, sampler, stop_ids, pad_id, step_key):
        rows = step_key[1][0]
        step = self._function(
            step_key, lambda: self._make_step(sampler, stop_ids, pad_id, rows=rows)
        )
        prefill_fn = self._function(
            ("prefill", step_key[1], prefill), lambda: self._make_prefill(prefill)
        )

        def run(tokens, prompt_mask, start, max_length, key):
            caches = prefill_fn(tokens)
            rows = tokens.shape[0]
            done = ops.zeros((rows,), "bool")
            scores = sampler.initial_scores(rows)
            index, stop = int(start), int(max_length)
            while index < stop and not bool(ops.convert_to_numpy(ops.all(done))):
                index_tensor = ops.convert_to_tensor(np.int32(index))
                tokens, caches, done, scores = step(
                    tokens, caches, index_tensor, prompt_mask, done, scores, key
                )
                index += 1
            tokens, done = sampler.finalize(tokens, done, scores)
            prompt = prompt_mask[:: sampler.num_beams]
            end = ops.convert_to_tensor(np.int32(index))
            return tokens, _output_mask(tokens, prompt, end, stop_ids)

        return run

    def _function(self, key, make):
        # Enabling LoRA or quantizing changes the weights a traced program reads: such a
        # model compiles afresh (and the stale programs are dropped).
        signature = tuple(id(v) for v in self.model.weights)
        if signature != self._signature:
            self._functions = {}
            self._signature = signature
        function = self._functions.get(key)
        if function is None:
            function = self._functions[key] = make()
        return function

    def _counted(self, function):
        # Python runs only while jax.jit, tf.function or jit.trace traces the function.
        def counted(*arguments):
            self.trace_count += 1
            return function(*arguments)

        return counted

    def _compile(self, function, xla=True):
        backend = keras.backend.backend()
        if backend != "torch":
            function = self._counted(function)
        if backend == "jax":
            return _jax_stateless_jit(self.model, function)
        if backend == "tensorflow":
            import tensorflow as tf

            # stream() steps use a plain graph: XLA compiles the 2-layer test model in ~5 s
            # and a real one in minutes, a long wait for the first streamed token, while
            # float32 matrix-vector products run as fast without it (FACTS.md).
            return tf.function(function, jit_compile=xla)
        return function  # torch: a Python loop around traced steps (see _make_step)


def _tied_logits(embedding, hidden):
    """float32 logits [batch, vocabulary] for one position `hidden` [batch, 1, hidden_dim].

    `embedding(hidden, reverse=True)` multiplies by the transposed (vocabulary, hidden)
    table, the form XLA runs slowest in float32 (gemma_2b_en's head: 110 ms a token against
    ~75 ms for `decode_matmul`); a quantized table keeps the layer's own path.
    """
    if embedding.quantization_mode is not None or embedding.reverse_dtype is not None:
        return ops.cast(embedding(hidden, reverse=True)[:, 0, :], "float32")
    dtype = embedding.compute_dtype
    rows = ops.cast(ops.reshape(hidden, (-1, hidden.shape[2])), dtype)
    logits = decode_matmul(rows, ops.cast(embedding.embeddings, dtype))
    if embedding.logit_soft_cap is not None:
        cap = embedding.logit_soft_cap
        logits = ops.multiply(ops.tanh(ops.divide(logits, cap)), cap)
    return ops.cast(logits, "float32")


def _output_mask(tokens, prompt_mask, end, stop_ids):
    """The prompt, then generated tokens up to and including each row's first stop token."""
    positions = ops.arange(tokens.shape[1], dtype="int32")[None, :]
    generated = ops.logical_and(ops.less(positions, end), ops.logical_not(prompt_mask))
    stops = ops.cast(ops.logical_and(generated, is_stop_token(tokens, stop_ids)), "int32")
    after_stop = ops.greater(ops.cumsum(stops, axis=1) - stops, 0)
    return ops.logical_and(ops.logical_or(prompt_mask, generated), ops.logical_not(after_stop))


def _sampler_key(sampler):
    # The sampler's configuration is baked into the compiled program.
    config = sampler.get_config()
    settings = sorted((k, repr(v)) for k, v in config.items() if k != "seed")
    return (type(sampler).__name__, tuple(settings))


def _jax_stateless_jit(model, function):
    """`jax.jit(function)` reading the model's weights from arguments, not as constants."""
    import jax

    def stateless(trainable, non_trainable, *arguments):
        mapping = list(zip(model.trainable_variables, trainable))
        mapping += list(zip(model.non_trainable_variables, non_trainable))
        with keras.StatelessScope(state_mapping=mapping):
            return function(*arguments)

    compiled = jax.jit(stateless)

    def run(*arguments):
        return compiled(
            [v.value for v in model.trainable_variables],
            [v.value for v in model.non_trainable_variables],
            *arguments,
        )

    return run


class _no_grad:
    """`torch.no_grad()` on the torch backend, nothing elsewhere."""

    def __enter__(self):
        if keras.backend.backend() == "torch":
            import torch

            self._context = torch.no_grad()
            self._context.__enter__()

    def __exit__(self, *exc):
        if keras.backend.backend() == "torch":
            self._context.__exit__(*exc)
