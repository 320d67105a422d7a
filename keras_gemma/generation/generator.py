"""The compiled prefill + decode loop behind `GemmaCausalLM.generate()` and `stream()`."""

import threading

import keras
import numpy as np
from keras import ops

from keras_gemma.generation.buckets import length_bucket
from keras_gemma.generation.buckets import prefill_bucket
from keras_gemma.generation import int4_steps
from keras_gemma.generation.layerwise_prefill import LayerwisePrefill
from keras_gemma.generation.layerwise_step import LayerwiseStep
from keras_gemma.generation.loop_parts import all_true as _all_true
from keras_gemma.generation.loop_parts import int8_weights_only as _int8_weights_only
from keras_gemma.generation.loop_parts import jax_stateless_jit as _jax_stateless_jit
from keras_gemma.generation.loop_parts import no_grad as _no_grad
from keras_gemma.generation.loop_parts import output_mask as _output_mask
from keras_gemma.generation.loop_parts import scalar_int32 as _scalar_int32
from keras_gemma.generation.loop_parts import sampler_key as _sampler_key
from keras_gemma.generation.loop_parts import tied_logits as _tied_logits
from keras_gemma.generation.sampler import read_column
from keras_gemma.generation.sharding import UNSHARDED
from keras_gemma.generation.sharding import GenerationSharding
from keras_gemma.generation.torch_compiled_step import CompiledStep
from keras_gemma.generation.torch_compiled_step import compile_enabled
from keras_gemma.generation.torch_step import TracedStep
from keras_gemma.layers import int4_decode_kernels
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

    Under a `keras.distribution` (JAX), inputs are split along the batch axis and the KV
    caches laid out like the attention's keys and values (`sharding.py`, which also gives
    the rule for a batch the batch axis does not divide); the programs are keyed by that
    layout too, so each bucket still compiles once.

    A sampler with `needs_hidden_states` (contrastive search) gets more from the loop: the
    prefill also keeps the prompt's final hidden states as the sampler's initial state, and
    each step hands the sampler the last position's hidden state and the model's cached
    forward step to run candidate tokens with (`_body_with_hidden`).

    Example:
    >>> generator = Generator(lm)
    >>> ids, mask = generator.generate(token_ids, prompt_mask, sampler=GreedySampler())
    """

    def __init__(self, model):
        self.model = model
        self.trace_count = 0
        # Guards the table of programs: threads asking for a new one at once get one program
        # (compiled once), not one each.
        self._lock = threading.RLock()
        self.reset()

    def reset(self):
        """Forget compiled functions (after weights change structure: LoRA, quantization)."""
        self._functions = {}
        self._signature = None
        self._sharding = UNSHARDED  # set from the current distribution by each call

    def _distribute(self, token_ids, prompt_mask, beams):
        # Rows added for the batch axis of the current distribution (if any), and the
        # layout's part of the compile keys.
        self._sharding = GenerationSharding.current(self.model)
        return self._sharding.rows_for(token_ids, prompt_mask, beams) + (self._sharding.key,)

    # Public entry points (numpy in, numpy out).

    def generate(self, token_ids, prompt_mask, sampler, stop_token_ids=(), pad_token_id=0):
        """Fills `token_ids` [batch, max_length] after each row's prompt (`prompt_mask`).

        Returns `(token_ids, padding_mask)` as numpy arrays of the input's shape; the mask
        covers the prompt and the generated tokens up to and including a stop token.
        """
        if getattr(sampler, "return_all_beams", False):
            raise ValueError(
                "BeamSampler(return_all_beams=True) cannot be used by generate(), which returns "
                "one sequence per prompt (KerasHub's generate() fails on it too). Use "
                "BeamSampler(num_beams=..., return_all_beams=False) to get the best beam."
            )
        token_ids = np.asarray(token_ids, dtype="int32")
        prompt_mask = np.asarray(prompt_mask, dtype=bool)
        batch, max_length = token_ids.shape
        start = self._start(prompt_mask)
        if start >= max_length:
            return token_ids.copy(), prompt_mask.copy()
        beams = sampler.num_beams
        token_ids, prompt_mask, layout = self._distribute(token_ids, prompt_mask, beams)
        tokens, mask, width = self._pad(token_ids, prompt_mask, sampler.num_beams, pad_token_id)
        prefill = prefill_bucket(start - 1, width)
        stop_ids = tuple(stop_token_ids)
        step_key = ("step", tokens.shape, _sampler_key(sampler), stop_ids, pad_token_id, layout)
        key = ("generate", prefill) + step_key[1:]
        function = self._function(
            key, lambda: self._make_generate(prefill, sampler, stop_ids, pad_token_id, step_key)
        )
        arguments = (tokens, mask, np.int32(start), np.int32(max_length), sampler.new_key())
        with _no_grad():
            tensors = [self._sharding.place(a) for a in arguments[:2]]
            tensors += [ops.convert_to_tensor(a) for a in arguments[2:]]
            output, output_mask = function(*tensors)
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
        token_ids, prompt_mask, layout = self._distribute(token_ids, prompt_mask, 1)
        tokens, mask, width = self._pad(token_ids, prompt_mask, 1, pad_token_id)
        prefill = prefill_bucket(start - 1, width)
        stop_ids = tuple(stop_token_ids)
        hidden = sampler.needs_hidden_states
        prefill_fn = self._function(
            ("prefill", tokens.shape, prefill, hidden, layout),
            lambda: self._make_prefill(prefill, keep_hidden=hidden),
        )
        key = ("step", tokens.shape, _sampler_key(sampler), stop_ids, pad_token_id, layout)
        step_fn = self._function(key, lambda: self._make_step(sampler, stop_ids, pad_token_id))
        random_key = ops.convert_to_tensor(sampler.new_key())
        # no_grad around each call, not the whole generator: the caller's code runs between
        # yields and must keep its own gradient mode.
        rows = tokens.shape[0]  # 1, or copies of it for the batch axis
        with _no_grad():
            tokens = self._sharding.place(tokens)
            mask = self._sharding.place(mask)
            kernels = self._int4_kernels(rows)
            caches, scores = self._initial_state(
                int4_steps.with_kernels(prefill_fn, kernels, tokens), sampler, rows
            )
            # Placed as the compiled step returns them, so that its second call reuses the
            # first one's program.
            done, scores = self._sharding.place_rows((ops.zeros((rows,), "bool"), scores), rows)
        for index in range(start, max_length):
            index_tensor = ops.convert_to_tensor(np.int32(index))
            with _no_grad():
                tokens, caches, done, scores = int4_steps.with_kernels(
                    step_fn, kernels, tokens, caches, index_tensor, mask, done, scores,
                    random_key,
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
        caches = [ops.zeros(shape, backbone.compute_dtype) for _ in range(backbone.num_layers)]
        return self._sharding.constrain(caches)

    def _prefill(self, tokens, prefill, keep_hidden=False):
        """The KV caches after the first `prefill` positions; with `keep_hidden`,
        `(caches, hidden)` where `hidden` is float32 [batch, width, hidden_dim], the final
        hidden states of those positions and zeros after them."""
        caches = self._empty_caches(tokens.shape[0], tokens.shape[1])
        hidden = None
        if prefill:
            hidden, caches = self.model.hidden_with_cache(tokens[:, :prefill], caches, 0)
            caches = self._sharding.constrain(caches)
        if not keep_hidden:
            return caches
        return caches, self._hidden_history(hidden, tokens.shape)

    def _hidden_history(self, hidden, shape):
        history = ops.zeros((shape[0], shape[1], self.model.backbone.hidden_dim), "float32")
        if hidden is None:
            return history
        return ops.slice_update(history, [0, 0, 0], ops.cast(hidden, "float32"))

    @staticmethod
    def _initial_state(prefilled, sampler, rows):
        """`(caches, sampler state)` from a prefill made with `keep_hidden` as the sampler
        needs."""
        if sampler.needs_hidden_states:
            caches, hidden = prefilled
            return caches, sampler.initial_state(rows, hidden)
        return prefilled, sampler.initial_state(rows)

    def _decode(self, token, caches, index):
        """float32 logits [batch, vocabulary] for `token` [batch, 1] at position `index`."""
        hidden, caches = self.model.hidden_with_cache(token, caches, index)
        caches = self._sharding.constrain(caches)
        return _tied_logits(self.model.backbone.token_embedding, hidden), caches

    def _body(self, decode, sampler, stop_ids, pad_id):
        if sampler.needs_hidden_states:
            return self._body_with_hidden(sampler, stop_ids, pad_id)

        def body(tokens, caches, index, prompt_mask, done, scores, key):
            token = ops.expand_dims(read_column(tokens, index - 1), 1)
            logits, caches = decode(token, caches, index - 1)
            return sampler.select(
                logits, tokens, caches, index, prompt_mask, done, scores, key, stop_ids, pad_id
            )

        return body

    def _body_with_hidden(self, sampler, stop_ids, pad_id):
        """The step for samplers that need hidden states: one ordinary step of the last
        token, then the sampler chooses, given that position's hidden state and the model's
        cached forward step to run its candidates with."""
        model = self.model

        def run(token_ids, caches, index):
            hidden, caches = model.hidden_with_cache(token_ids, caches, index)
            return hidden, self._sharding.constrain(caches)

        def body(tokens, caches, index, prompt_mask, done, scores, key):
            token = ops.expand_dims(read_column(tokens, index - 1), 1)
            hidden, caches = run(token, caches, index - 1)
            logits = _tied_logits(model.backbone.token_embedding, hidden)
            return sampler.select_with_hidden(
                logits, hidden[:, 0, :], run, tokens, caches, index, prompt_mask, done, scores,
                key, stop_ids, pad_id,
            )

        return body

    def _make_prefill(self, prefill, keep_hidden=False):
        if keras.backend.backend() == "jax" and self._steps_from_python():
            layerwise = LayerwisePrefill(self.model, self._counted)

            def run(tokens, kernels=None):
                caches = self._empty_caches(tokens.shape[0], tokens.shape[1])
                if not keep_hidden:
                    return layerwise(tokens, caches, prefill, kernels)
                caches, hidden = layerwise.with_hidden(tokens, caches, prefill, kernels)
                return caches, self._hidden_history(hidden, tokens.shape)

            return run
        return self._compile(lambda tokens: self._prefill(tokens, prefill, keep_hidden), xla=False)

    def _make_step(self, sampler, stop_ids, pad_id, rows=1):
        step = self._body(self._decode, sampler, stop_ids, pad_id)
        if keras.backend.backend() == "torch":
            runner = CompiledStep if compile_enabled() else TracedStep
            return runner(self._counted(step), self.model)
        # Contrastive search runs its candidates through the whole model inside the step,
        # which the block-by-block step cannot: it keeps the one-program step.
        layerwise = rows > 1 and not sampler.needs_hidden_states
        if layerwise and keras.backend.backend() == "jax" and self._steps_from_python():
            backbone = self.model.backbone

            def finish(hidden, tokens, caches, index, prompt_mask, done, scores, key):
                hidden = backbone.final_normalization(hidden)
                logits = _tied_logits(backbone.token_embedding, hidden)
                return sampler.select(
                    logits, tokens, caches, index, prompt_mask, done, scores, key, stop_ids,
                    pad_id,
                )

            return LayerwiseStep(self.model, finish, self._counted)
        if keras.backend.backend() == "jax" and int4_decode_kernels.applies(self.model.backbone):
            return int4_steps.step_reading_kernels(
                step, self.model.backbone, lambda function: self._compile(function, xla=False)
            )
        return self._compile(step, xla=False)

    def _int4_kernels(self, rows):
        """Per decoder block, its int4 kernels dequantized for one generate() or stream()
        call of `rows` rows (JAX on a CPU; int4_steps.py), or None."""
        prepare = self._function(
            ("int4 kernels", rows), lambda: int4_steps.kernels_function(self.model, rows)
        )
        return None if prepare is None else prepare()

    def _make_generate(self, prefill, sampler, stop_ids, pad_id, step_key):
        if self._steps_from_python():
            return self._make_stepwise_generate(prefill, sampler, stop_ids, pad_id, step_key)
        body = self._body(self._decode, sampler, stop_ids, pad_id)

        def run(tokens, prompt_mask, start, max_length, key):
            rows = tokens.shape[0]
            prefilled = self._prefill(tokens, prefill, sampler.needs_hidden_states)
            caches, scores = self._initial_state(prefilled, sampler, rows)
            done = ops.zeros((rows,), "bool")

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

        torch: always (see torch_step.py). JAX: when the weights are 16-bit or integer
        (`quantize`) and XLA runs on the CPU (an accelerator has bfloat16 dots, and one
        compiled loop). XLA's CPU dot
        has no bfloat16 kernel: it converts each weight to float32 on the fly, and the
        whole-loop program (prefill + `lax.while_loop`) held float32 copies of the weights
        at once (gemma_2b_en in bfloat16 ran out of 24 GB; presumably the loop-invariant
        conversions are hoisted out of the loop). A step compiled on its own converts within
        each product, and the memory stays at the bfloat16 size; the prefill
        runs block by block for the same reason (`layerwise_prefill.py`), and so does a
        step of several rows (`layerwise_step.py`). int4 weights too, their kernels
        dequantized once per call and handed to the steps (`int4_decode_kernels.py`).
        """
        backend = keras.backend.backend()
        if backend == "torch":
            return True
        if backend != "jax" or not xla_runs_on_cpu():
            return False
        backbone = self.model.backbone
        dtype = keras.backend.standardize_dtype(backbone.compute_dtype)
        return (dtype in ("bfloat16", "float16") or _int8_weights_only(backbone)
                or int4_decode_kernels.applies(backbone))

    def _make_stepwise_generate(self, prefill, sampler, stop_ids, pad_id, step_key):
        rows = step_key[1][0]
        step = self._function(
            step_key, lambda: self._make_step(sampler, stop_ids, pad_id, rows=rows)
        )
        hidden = sampler.needs_hidden_states
        prefill_fn = self._function(
            ("prefill", step_key[1], prefill, hidden),
            lambda: self._make_prefill(prefill, keep_hidden=hidden),
        )

        def run(tokens, prompt_mask, start, max_length, key):
            rows = tokens.shape[0]
            kernels = self._int4_kernels(rows)
            caches, scores = self._initial_state(
                int4_steps.with_kernels(prefill_fn, kernels, tokens), sampler, rows
            )
            # Placed as the compiled step returns them, so that its second call reuses the
            # first one's program.
            done, scores = self._sharding.place_rows((ops.zeros((rows,), "bool"), scores), rows)
            index, stop = int(start), int(max_length)
            while index < stop and not _all_true(done):
                index_tensor = _scalar_int32(index)
                tokens, caches, done, scores = int4_steps.with_kernels(
                    step, kernels, tokens, caches, index_tensor, prompt_mask, done, scores, key
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
        with self._lock:
            if signature != self._signature:
                self._functions = {}
                self._signature = signature
            if key not in self._functions:
                # None is kept too (no int4 kernels for this model): asked once, not per call.
                self._functions[key] = make()
            return self._functions[key]

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
            # No autograph: the loops are written with ops.while_loop/ops.cond already, and
            # converting every Keras call on the way costs a third of the first generate's
            # time (tiny model: 2.9 s -> 1.9 s).
            return tf.function(function, jit_compile=xla, autograph=False)
        return function  # torch: a Python loop around traced steps (see _make_step)

