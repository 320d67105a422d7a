"""The PyTorch decode step compiled by Inductor, on a CPU: opt-in, `KERAS_GEMMA_TORCH_COMPILE=1`.

The traced step (torch_step.py) replays its recorded aten ops one dispatch at a time: ~85 a
Gemma 3 block in float32, ~1,500-2,000 a token on the 270M. Here the same step is recorded
by `make_fx` (aten ops, no Keras Python, ~2 s for the 270M) and compiled by Inductor with
its C++ wrapper (`compile_fx` on the recorded graph; no dynamo, so no guards on each call):
the element-wise ops of a block (norms, RoPE, softmax, gating) fuse into a few loops; a
product of one row (batch 1) becomes a loop of Inductor's own that streams the weight at
memory speed (layers/one_row_product.py: float32, bfloat16 and int8 weights); products of
several rows call oneDNN's or the packed int8/int4 kernels from C++.

Measured (2026-12-06, the 2-core AMD EPYC with AVX-512, 2 torch threads, torch 2.13), decode
tok/s and peak RSS in one run of `benchmarks/gemma3_270m.py --backends jax,torch,inductor`
(batch 1, 64 new tokens; llama.cpp Q4_K_M, native build, 93.0 in 0.4 GB in the same run):

    Gemma 3 270M    JAX          torch traced   torch compiled   first compile s (cold)
    float32         44.6 2.1 GB   32.1 2.9 GB    41.4 2.9 GB       47
    bfloat16        54.5 1.8      39.9 1.5       93.9 1.5          32
    int8            64.0 1.8      86.1 1.1      134.6 1.4          36
    int4            35.7 2.8      90.6 1.1      126.8 1.2         106

In an earlier run of the same code bar the recording's memory (below): float32 36.0 /
28.8 / 41.2, bfloat16 55.7 / 40.0 / 83.2, int8 67.3 / 90.3 / 130.1, int4 35.7 / 91.1 /
131.3, llama.cpp 94.9. A later run with three interleaved rounds (`--rounds 3`, each row's
best; every round's figure after it): float32 JAX 38.4 (38.4 36.8 36.4), traced 36.9 (36.9
35.6 30.5), compiled 58.3 (58.3 56.4 38.6); bfloat16 JAX 57.5, traced 39.0, compiled 67.6.
Once Inductor's disk cache served the float steps (two rounds): float32 JAX 43.1 (35.5
43.1), traced 36.9, compiled 60.0 (60.0 55.5); bfloat16 JAX 58.1, traced 39.0, compiled
82.9 (65.4 82.9); int8 JAX 61.2, traced 81.5, compiled 136.9; the benchmark's compile
column (two buckets, warm-up calls less the timed ones): float32 9.1 s, bfloat16 10.8 s
(was 30.4 and 35.5), int8 41 s.

float32 reads 1.07 GB a token, and the compiled step runs it at ~40 or ~56-60 tok/s (43 or
60-64 GB/s), switching while a process runs: one process, weights untouched, timed 57.1,
55.9 and 40.9 in a row. Not the pages: torch's huge-page allocations
(THP_MEM_ALLOC_ENABLE=1) gave 49 and 60 in two processes, and without them, weights copied
into 2 MB pages (1.1 GB AnonHugePages) 60 and 44. What is left, as far as a guest can
tell, is the memory throughput this virtual machine gets from its host at the time, which
two threads streaming one product feel most (JAX's figures move less: 36-45). Hence rounds,
interleaved, in the benchmark.

In one run of `benchmarks/generate.py --backends jax,torch,inductor` (the tiny shape,
2 layers, hidden 256): batch 1 JAX 8,980, torch traced 2,298, compiled 8,018 tok/s; batch 8
1,929 / 1,257 / 2,523 a row. Before one-row products (the same step with the library
products; A/B in one process): 270M bfloat16 44.9 -> 67.7, int8 92.9 -> 131.8, int4
102.9 -> 128.2, float32 30.5 -> 39.0; the tiny shape 4,567 -> 8,066 (and 3,458 with
`torch.compile`'s dynamo in front). The cost is the compile, once per shape bucket and
sampler: for the 270M in float32, ~2 s of recording plus 23-27 s of Inductor the first
time on a machine, and 0.4-1.8 s of Inductor in any later process, whose step Inductor's
on-disk cache serves (first `generate` of 64 tokens: 15.3 s before the cache served it,
6.2 s after; the tiny shape 6 s cold). Steps holding packed int8/int4 weights are not
cached (`_record`) and compile in full each time (the 270M: 30-106 s). The recording runs
the step once with real weights (+0.05-0.3 GB at the 270M's peak). The first call's wait is
why it is not the default. Set `KERAS_GEMMA_TORCH_COMPILE=1` before generating to use it.

Inductor keeps a fused kernel's intermediate values in float32 where the traced step rounds
each op's result to bfloat16 (and skips bfloat16 round trips), so a bfloat16 model's greedy
text may part from the traced step's (the 270M's stayed with float32's text for 64 tokens
where the traced bfloat16 step parted after 4); in float32, int8 and int4 the ids are equal
(tests/test_torch_compiled_step.py).

CPU only for now: on a GPU the same graph would want CUDA graph replay, which no GPU has
run here yet; a model on a GPU keeps the traced step. A step that `make_fx` cannot record
or Inductor cannot compile (a warning says why) falls back to the traced step.
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
    (`_stale`): the program is Inductor's alone, without `torch.compile`'s guards, which
    cost ~0.5 ms a call for the 270M's ~600 inputs. After the first call,
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
            one_row_product.register_with_inductor()
            # Inductor keys its on-disk cache by the graph and, for tensors held in it (the
            # packed int8/int4 weights), by their values read into Python lists: gigabytes
            # for the 270M's. Such a step compiles afresh each time, as it always did.
            cached = _constant_bytes(module) <= CACHED_CONSTANT_BYTES
            with torch.no_grad(), _tracing_context():
                program = compile_fx(module, list(inputs), config_patches={
                    "cpp_wrapper": True, "fx_graph_cache": cached})

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


# A step holding more bytes of tensors than this skips Inductor's on-disk cache (see _record).
CACHED_CONSTANT_BYTES = 1 << 20


def _constant_bytes(module):
    """Bytes of the tensors a recorded graph holds (its get_attr nodes' values)."""
    import functools

    import torch

    total = 0
    for node in module.graph.nodes:
        if node.op == "get_attr":
            value = functools.reduce(getattr, node.target.split("."), module)
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total


def _tracing_context():
    """The context dynamo would give Inductor: a fake-tensor mode with a shape environment.
    Without one Inductor bypasses its on-disk graph cache ("No shape env"), so every process
    lowered and generated the whole step again (the 270M: ~20 of ~30 s a bucket)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    context = torch._guards.TracingContext(FakeTensorMode(shape_env=ShapeEnv()))
    return torch._guards.tracing(context)


def _layout(tensor):
    return (tensor.shape, tensor.stride(), tensor.dtype, tensor.device)
