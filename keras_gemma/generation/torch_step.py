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

What is replayed is the op count, one dispatch each (one kernel launch each on a GPU): a
Gemma 3 decoder block recorded 426 aten ops before issue 16 and replays ~100 (float32; ~127
in bfloat16, whose norms and RoPE cast to float32 and back), tests/test_torch_decode_ops.py
holds it under 150. The layers make each step's masks and rotary tables once for all blocks
(`CachePositions`), and write the KV cache in place while this step is traced
(`cache_writes_in_place`: the caches are the Generator's); `simplified` drops the ops of the
recorded graph that do nothing. Measured on the real Gemma 3 270M (this 2-core machine, 1
torch thread, float32, 2026-12-01): 10.0 -> 12.3-12.5 tok/s; the step is now ~85% matrix
products, and torch's float32 matrix-vector product reads a DRAM-resident matrix at ~13-15
GB/s (every form: W @ x.T, x @ W.T, F.linear, mv) where XLA reads ~20. That was the memory
order: stored column-major, the wide kernels (the 270M's tied logits above all) read at
XLA's speed (decode_matmul.lay_out_for_decode; 1.31x end to end, and torch float32 then
decodes the 270M as fast as JAX float32 on one core: 11.1 vs 10.4 and 10.5 vs 8.6 tok/s,
interleaved, both pinned to one core of the shared machine, 2026-12-01). With two threads
that product stays on one (MKL); oneDNN's uses both (decode_matmul.py), and the step makes
four products a block instead of seven (shared_rows.py): on the AVX-512 EPYC of 2026-12-06,
2 threads, the 270M in float32 went from 20.3 to ~36-40 tok/s (see the issue 16 note for
the run against JAX). The Python around each replay (flattening the arguments, reading the
done flags) is kept to a few microseconds: the tiny benchmark shape's token 0.53 -> 0.36 ms.
With as many torch threads as cores, any busy neighbour halves torch (OpenMP threads
spin-wait for the descheduled one: 11.1 -> 5.9 tok/s; OMP_WAIT_POLICY=PASSIVE 10.9; one
thread 12.1); with two other processes busy, 2 threads fell to ~1 tok/s where JAX kept 8-9.

The model weights are traced as inputs (read through a `keras.StatelessScope`), so
fine-tuning, LoRA and quantization are seen by the graph. The packed int8/int4 products
(layers/quantized_products.py) are the exception: what they make once from the quantized
variables is recorded as a constant, so a step whose non-trainable variables were replaced
or written since it was traced traces again. `jit.trace` is deprecated in
torch 2.13; if it is missing or fails, the step runs eagerly.
Set `KERAS_GEMMA_TORCH_TRACE=0` to always decode eagerly.

`torch.compile` of the Keras step itself is what the table above measured. Recording the
step's aten ops with `make_fx` instead (seconds, no Keras Python) and compiling that graph
is torch_compiled_step.py's `CompiledStep`, opt-in (`KERAS_GEMMA_TORCH_COMPILE=1`):
it runs the tiny shape's step ~1.4x faster and the 270M int4's ~1.1x, at a compile per
bucket.
"""

import os
import threading
import warnings

import keras
from keras import tree

from keras_gemma.layers import shared_rows
from keras_gemma.layers.kv_cache import cache_writes_in_place


def tracing_enabled():
    return os.environ.get("KERAS_GEMMA_TORCH_TRACE", "1") not in ("0", "false", "False")


class TracedStep:
    """Calls `function(*arguments)` through a `torch.jit.trace` of it made on the first call.

    `arguments` and the result may be nested lists/tuples of tensors; their shapes must not
    change between calls (the caller keys one `TracedStep` per shape bucket).

    After the first call, `recorded_graph` is the graph `torch.jit.trace` recorded and
    `graph` the one replayed (`simplified`); both None when the step runs eagerly.

    Example:
    >>> step = TracedStep(body, model)
    >>> tokens, caches, done, scores = step(tokens, caches, index, mask, done, scores, key)
    """

    def __init__(self, function, model):
        self.function = function
        self.model = model
        self.recorded_graph = None
        self.graph = None
        self._variable_list = None
        self._traced = None
        self._failed = not tracing_enabled()
        self._output_structure = None
        self._frozen = ()  # (index, tensor, version) of the non-trainable values traced
        self._shared_rows = ()  # positions of weights the step reads as one buffer
        # Threads generating at once trace a new step once: the others wait for it.
        self._trace_lock = threading.Lock()

    def _variables(self):
        # Listed once: collecting them walks every layer (~3 ms a step for 18 blocks), and
        # the Generator makes a new TracedStep whenever the model's variables change.
        if self._variable_list is None:
            trainable = self.model.trainable_variables
            self._variable_list = trainable + self.model.non_trainable_variables
            self._first_frozen = len(trainable)
        return self._variable_list

    def _stale(self, values, flat):
        """Whether a non-trainable value changed since the trace (a new tensor or a write), or
        weights the step reads as one buffer (shared_rows.py) no longer lie in one. (`flat`,
        the step's other inputs, are of the shapes traced: the caller keys one step per
        shape.)"""
        if any(values[i] is not t or t._version != version for i, t, version in self._frozen):
            return True
        return not shared_rows.still_consecutive(self._shared_rows, values)

    def __call__(self, *arguments):
        if self._failed:
            return self.function(*arguments)
        variables = self._variables()
        values = current_values(variables)
        flat = _flatten(arguments)
        if self._traced is None or self._stale(values, flat):
            with self._trace_lock:
                if self._traced is None or self._stale(values, flat):
                    self._trace(variables, values, arguments, flat)
            if self._failed:
                return self.function(*arguments)
        outputs = self._traced(*values, *flat)
        return _packed(self._output_structure, iter(outputs))

    def _trace(self, variables, values, arguments, flat):
        count = len(variables)

        def flat_function(*inputs):
            weights, rest = inputs[:count], inputs[count:]
            with keras.StatelessScope(state_mapping=list(zip(variables, weights))):
                outputs = self.function(*tree.pack_sequence_as(arguments, list(rest)))
            self._output_structure = outputs
            return tuple(tree.flatten(outputs))

        try:
            # The caches passed in are the Generator's, replaced by the step's outputs:
            # the step may write them in place (recorded as such in the graph).
            with cache_writes_in_place(), shared_rows.recording_groups(values) as groups:
                self._traced = self._record(flat_function, tuple(values) + tuple(flat))
        except Exception as error:  # an op that cannot be traced: decode eagerly instead
            warnings.warn(f"torch.jit.trace of the decode step failed ({error}); decoding eagerly.")
            self._failed = True
            return
        self._shared_rows = shared_rows.checked_groups(groups, values)
        self._frozen = tuple(
            (i, values[i], values[i]._version) for i in range(self._first_frozen, len(values))
        )

    def _record(self, flat_function, inputs):
        """The callable replayed for `flat_function(*inputs)`: its `torch.jit.trace`,
        `simplified`. Runs `flat_function` once (writing the caches it is given)."""
        import torch

        with warnings.catch_warnings():
            # Shape-to-int conversions are fine: shapes are fixed per TracedStep.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            traced = torch.jit.trace(flat_function, inputs, check_trace=False)
        self.recorded_graph = self.graph = traced.graph
        try:
            traced = simplified(traced)
            self.graph = traced.graph
        except Exception as error:  # a torch without these internals: keep the plain trace
            warnings.warn(f"could not simplify the traced decode step ({error}).")
        return traced


def _flatten(structure):
    """The tensors of nested lists/tuples, in order (`keras.tree.flatten` for the decode
    step's arguments, which are nothing else: ~0.1 ms less a step than the general one)."""
    if isinstance(structure, (list, tuple)):
        return [leaf for item in structure for leaf in _flatten(item)]
    if structure is None or isinstance(structure, dict):
        return tree.flatten(structure)
    return [structure]


def _packed(structure, leaves):
    """`keras.tree.pack_sequence_as(structure, list(leaves))` for nested lists/tuples."""
    if isinstance(structure, (list, tuple)):
        items = [_packed(item, leaves) for item in structure]
        return type(structure)(*items) if hasattr(structure, "_fields") else type(structure)(items)
    if structure is None or isinstance(structure, dict):
        count = len(tree.flatten(structure))
        return tree.pack_sequence_as(structure, [next(leaves) for _ in range(count)])
    return next(leaves)


def current_values(variables):
    """`[v.value for v in variables]`, read without `Variable.value`'s checks where they
    cannot change the answer.

    `Variable.value` looks for a StatelessScope, an autocast scope and a meta device on every
    read, ~3 us each: 0.75-0.94 ms a decode step for the 270M's 236 variables (measured,
    2026-12-01), 1-2% of its step and more of a small model's. Outside those scopes it
    returns the stored tensor itself, which is what this reads.

    Example:
    >>> values = current_values(model.trainable_variables)
    """
    from keras.src.backend.common.stateless_scope import in_stateless_scope
    from keras.src.backend.common.variables import get_autocast_scope
    from keras.src.backend.torch.core import get_device

    values = [v._value for v in variables]
    if (
        in_stateless_scope()
        or get_autocast_scope() is not None
        or str(get_device()) == "meta"
        or any(value is None for value in values)
    ):
        return [v.value for v in variables]
    return values


def simplified(traced):
    """`traced` (a `torch.jit.trace` of a function) with the ops that do nothing removed.

    - Keras' torch backend moves every tensor an op receives to its device, `x.to("cpu")`:
      it compares `x.device` with the string "cpu", which torch 2.13 never finds equal, and
      casts with `x.to(dtype)` where the dtype is the tensor's own. Each such `aten::to`
      returns its input, yet the replayed graph dispatches it: on a Gemma 3 decoder block
      they were ~140 of ~425 recorded ops.
    - `x[:, i]` records a slice of the whole first axis before the select: a view equal to
      its input; `contiguous()` of a tensor the step made contiguous returns it (the packed
      int8/int4 products' inputs, 7 ops a block).
    - Shapes are fixed per TracedStep, so `aten::size` of a traced tensor is a constant
      (the tracer records it, and the `aten::Int` conversions after it, as if it could vary).
    Constant propagation and dead-code elimination then fold what depended on those.
    """
    import torch

    graph = traced.graph.copy()
    # TorchScript functions called while tracing (torch_onednn_product's oneDNN product) are
    # recorded as calls; inlined, they replay without the call's overhead.
    torch._C._jit_pass_inline(graph)
    for node in list(graph.nodes()):
        if node.kind() == "mkldnn::_linear_pointwise":
            _give_linear_output_its_type(node)
    for node in list(graph.nodes()):
        if node.kind() == "aten::to" and _returns_its_input(node):
            node.output().replaceAllUsesWith(next(node.inputs()))
            node.destroy()
        elif node.kind() == "aten::slice" and _is_full_slice(node):
            node.output().replaceAllUsesWith(next(node.inputs()))
            node.destroy()
        elif node.kind() == "aten::contiguous" and _made_contiguous(next(node.inputs())):
            node.output().replaceAllUsesWith(next(node.inputs()))
            node.destroy()
        elif node.kind() == "aten::size":
            size = _constant_size(node)
            if size is not None:
                with graph.insert_point_guard(node):
                    constant = graph.insertConstant(size)
                node.output().replaceAllUsesWith(constant)
                node.destroy()
    torch._C._jit_pass_constant_propagation(graph)
    torch._C._jit_pass_dce(graph)
    return torch._C._create_function_from_graph("decode_step", graph)


def _give_linear_output_its_type(node):
    """Types an inlined oneDNN product's output [rows, out] like its input (the function's
    own graph says only "Tensor"), so that the `aten::to` passes below can see through it."""
    import torch

    inputs, weight = (value.type() for value in list(node.inputs())[:2])
    if not all(isinstance(t, torch._C.TensorType) for t in (inputs, weight)):
        return
    input_sizes, weight_sizes = inputs.sizes(), weight.sizes()
    if not input_sizes or not weight_sizes or inputs.dtype() is None:
        return
    node.output().setType(inputs.with_sizes(list(input_sizes[:-1]) + [weight_sizes[0]]))


def _returns_its_input(node):
    """Whether an `aten::to` node keeps its input's dtype and device and makes no copy."""
    import torch

    source, result = next(node.inputs()).type(), node.output().type()
    if not (isinstance(source, torch._C.TensorType) and isinstance(result, torch._C.TensorType)):
        return False
    if source.dtype() is None or source.dtype() != result.dtype():
        return False
    if source.device() is None or source.device() != result.device():
        return False
    arguments = torch._C.parse_schema(node.schema()).arguments
    for argument, value in zip(arguments, node.inputs()):
        if argument.name in ("copy", "memory_format"):
            if value.node().kind() != "prim::Constant":
                return False
            constant = value.toIValue()
            if argument.name == "copy" and constant:
                return False
            if argument.name == "memory_format" and constant not in (None, torch.preserve_format):
                return False
    return True


def _made_contiguous(value):
    """Whether `value` is made inside the graph by an op whose traced result is contiguous
    (so `contiguous()` on it returns it: the int8/int4 products' inputs). Shapes and strides
    are fixed per TracedStep; the step's own inputs are not trusted (weights may move)."""
    import torch

    if value.node().kind() == "prim::Param":
        return False
    kind = value.type()
    if not isinstance(kind, torch._C.TensorType):
        return False
    sizes, strides = kind.sizes(), kind.strides()
    if not sizes or not strides or not all(isinstance(x, int) for x in sizes + strides):
        return False
    expected = 1
    for size, stride in reversed(list(zip(sizes, strides))):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def _is_full_slice(node):
    """Whether an `aten::slice(tensor, dim, start, end, step)` node keeps the whole axis."""
    inputs = list(node.inputs())
    if len(inputs) != 5 or any(v.node().kind() != "prim::Constant" for v in inputs[1:]):
        return False
    sizes = inputs[0].type().sizes() if hasattr(inputs[0].type(), "sizes") else None
    dim, start, end, step = (v.toIValue() for v in inputs[1:])
    if not sizes or dim is None or step != 1 or start not in (None, 0):
        return False
    return end is None or (isinstance(sizes[dim], int) and end >= sizes[dim])


def _constant_size(node):
    """The int an `aten::size(tensor, dim)` node returns, if the trace fixed it."""
    inputs = list(node.inputs())
    if len(inputs) != 2 or inputs[1].node().kind() != "prim::Constant":
        return None
    sizes = inputs[0].type().sizes() if hasattr(inputs[0].type(), "sizes") else None
    if not sizes:
        return None
    size = sizes[inputs[1].toIValue()]
    return size if isinstance(size, int) else None
