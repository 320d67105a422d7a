"""The PyTorch decode step compiled by Inductor, on a CPU: opt-in, `KERAS_GEMMA_TORCH_COMPILE=1`.

The traced step (torch_step.py) replays its recorded aten ops one dispatch at a time: ~85 a
Gemma 3 block in float32, ~1,500-2,000 a token on the 270M. Here the same step is recorded
by `make_fx` (aten ops, no Keras Python, ~2 s for the 270M) and compiled by Inductor with
its C++ wrapper: the element-wise ops of a block (norms, RoPE, softmax, gating) fuse into a
few loops, and the products (oneDNN's, the packed int8/int4 ones) are called from C++.

Measured (2026-12-06, the 2-core AMD EPYC with AVX-512, 2 torch threads, torch 2.13; one
step replayed, best of 5 x 30, traced -> compiled, same ids; first compile, Inductor's disk
cache empty):

    model, weights                    traced ms   compiled ms   compile s
    tiny shape (benchmarks/generate)    0.345       0.240          6
    Gemma 3 270M float32               23.9        23.2-23.7      32
    Gemma 3 270M int8                  10.76        9.05          45
    Gemma 3 270M int4                   9.53        8.26          47

and decode tok/s in one run of each benchmark (`--backends jax,torch,inductor`, 2 threads):
the 270M float32 JAX 38.7, torch 39.1, compiled 42.1; int8 torch 90.3, compiled 98.5; int4
torch 98.4, compiled 106.4 (llama.cpp Q4_K_M 94.4); the tiny shape batch 1 JAX 8,864, torch
2,461, compiled 3,458 (batch 8: 2,401 / 1,245 / 2,238 a row); in another run the 270M
bfloat16 traced 32.9, compiled 38.9 (float32 traced 37.2, compiled 37.8). So it pays where the per-op overhead is a large share of a token: small models and the
packed low-bit products; float32 at 270M is bound by reading its weights. The cost is the
compile, once per shape bucket and sampler (Inductor keeps compiled code on disk, so a
second process compiles faster), which is why it is not the default. Set
`KERAS_GEMMA_TORCH_COMPILE=1` before generating to use it.

In bfloat16, Inductor keeps a fused kernel's intermediate values in float32 where the
traced step rounds each op's result to bfloat16, so greedy text may part from the traced
step's (the 270M's did after 4 tokens of 64); in float32, int8 and int4 the ids are equal
(tests/test_torch_compiled_step.py).

CPU only for now: on a GPU the same graph would want `mode="reduce-overhead"` (CUDA graph
replay), which no GPU has run here yet; a model on a GPU keeps the traced step. A step that
`make_fx` cannot record or Inductor cannot compile (a warning says why) falls back to the
traced step.
"""

import os
import warnings

from keras_gemma.generation.torch_step import TracedStep
from keras_gemma.layers import inductor_recording
from keras_gemma.layers import one_row_product


def compile_enabled():
    return os.environ.get("KERAS_GEMMA_TORCH_COMPILE", "0") in ("1", "true", "True")


class CompiledStep(TracedStep):
    """A `TracedStep` whose step is recorded by `make_fx` and compiled by Inductor.

    The same contract as `TracedStep` (fixed shapes per instance; the weights read as
    inputs; a step whose frozen values changed is compiled again). Inductor's code assumes
    the strides and dtypes it was compiled for: a step whose inputs are laid out otherwise
    (a weight replaced by a tensor of another memory order) is compiled again, checked here
    rather than by `torch.compile`'s guards, which cost ~0.5 ms a call for the 270M's ~600
    inputs (the tiny shape: 3,196 -> 3,671 tok/s without them). After the first call,
    `compiled` says whether Inductor's program runs (False: the traced step does), and
    `graph` is the recorded `torch.fx` graph.

    Example:
    >>> step = CompiledStep(body, model)
    >>> tokens, caches, done, scores = step(tokens, caches, index, mask, done, scores, key)
    """

    def __init__(self, function, model):
        super().__init__(function, model)
        self.compiled = False
        self._value_ids = self._layouts = self._strides = None

    def _stale(self, values, flat):
        if super()._stale(values, flat):
            return True
        if not self.compiled:
            return False
        # Strides on every call (a weight re-pointed through `Parameter.data` keeps its id; a
        # cache may come as a broadcast view: the contrastive sampler's candidates); shapes
        # and dtypes where a weight is another tensor (the arguments' are fixed per step).
        if [t.stride() for t in values] + [t.stride() for t in flat] != self._strides:
            return True
        if [id(t) for t in values] == self._value_ids:
            return False
        if any(_layout(t) != layout for t, layout in zip(values, self._layouts)):
            return True
        self._value_ids = [id(t) for t in values]  # other tensors, laid out the same
        return False

    def _record(self, flat_function, inputs):
        import torch

        self.compiled = False
        if any(t.device.type != "cpu" for t in inputs):
            return super()._record(flat_function, inputs)
        try:
            from torch._inductor.compile_fx import compile_fx
            from torch._inductor.decomposition import select_decomp_table
            from torch.fx.experimental.proxy_tensor import make_fx

            with inductor_recording.on(), torch.no_grad():
                module = make_fx(flat_function)(*inputs)
            # Inductor straight on the recorded graph, without dynamo: no guards evaluated
            # on each call (`_stale` checks what matters; dynamo's cost ~0.1-0.5 ms a call)
            # and none to fail (`torch.compile` of the int8 step's graph recompiled under
            # `skip_guard_eval_unsafe` and failed). make_fx's example values are dropped:
            # the packed int8 constants, made outside the recording, carry another fake
            # mode, and Inductor refused the mix; it traces the graph afresh without them.
            for node in module.graph.nodes:
                node.meta.pop("val", None)
                node.meta.pop("tensor_meta", None)
            with torch.no_grad():
                program = compile_fx(
                    module, list(inputs), config_patches={"cpp_wrapper": True},
                    decompositions={**select_decomp_table(), **one_row_product.decompositions()},
                )

            def run(*arguments):
                with torch.no_grad():
                    return program(*arguments)

            # Runs once now, so that a failure falls back here rather than mid-generate.
            # Each call runs the step: the cache writes repeat the recording's, in place.
            run(*inputs)
        except Exception as error:
            warnings.warn(
                f"Inductor could not compile the decode step ({type(error).__name__}: "
                f"{str(error)[:500]}); using the traced step."
            )
            return super()._record(flat_function, inputs)
        self.recorded_graph = self.graph = module.graph
        self.compiled = True
        count = len(self._variable_list)  # the weights come first, then the step's arguments
        self._layouts = [_layout(t) for t in inputs[:count]]
        self._strides = [t.stride() for t in inputs]
        self._value_ids = [id(t) for t in inputs[:count]]
        return run


def _layout(tensor):
    return (tensor.shape, tensor.stride(), tensor.dtype, tensor.device)
