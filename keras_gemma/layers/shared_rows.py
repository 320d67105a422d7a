"""One product for the projections that read the same rows, in a torch decode step.

A decode step multiplies one row per sequence by each weight. At that size a product costs a
fixed amount beyond reading its weight (oneDNN: ~8.5 us a call on this CPU), and small
weights are read slower than large ones. The query, key and value projections read the same
normalized rows, and so do the two gating projections of the feed-forward. So on torch their
kernels (each stored [outputs..., inputs]) are placed at build time as consecutive row blocks
of one buffer (`share_rows`), and a decode step multiplies by the [all outputs, inputs] view
of that buffer once and splits the result (`decode_products`). The variables keep their
names, shapes and values: Keras assigns into a variable's tensor in place (loading, optimizer
steps, `merge_lora`), so the blocks stay where they are.

Measured on the AVX-512 EPYC of 2026-12-06 (torch 2.13, 2 threads, float32 through oneDNN,
the real Gemma 3 270M's 18 blocks, weights not cache-resident): the block products of a
decode step take 11.55 ms as seven products a block and 10.6 ms as four.

Anything else keeps one product per projection: LoRA (its merged kernel is a new tensor),
quantized kernels, column-major kernels (decode_matmul.lay_out_for_decode), JAX and
TensorFlow (XLA fuses what it wants). A traced decode step records the buffer's view as
`as_strided` over the first kernel; `torch_step.TracedStep` checks before every replay that
the kernels still lie where the view assumes (`checked_groups`), and traces again if not.

Example:
>>> share_rows([query._kernel, key._kernel, value._kernel])
>>> query_rows, key_rows, value_rows = decode_products(rows, [query_kernel, key_kernel,
...                                                           value_kernel])
"""

import contextlib
import math
import threading

import keras

from keras_gemma.layers.decode_matmul import decode_matmul

_tracing = threading.local()


def share_rows(variables):
    """On torch, moves the values of `variables` (float kernels [outputs..., inputs], the same
    inputs and dtype, row-major) into consecutive row blocks of one new buffer; values and
    shapes unchanged. Does nothing elsewhere or when any of them does not qualify."""
    if keras.backend.backend() != "torch" or len(variables) < 2:
        return
    import torch

    values = [getattr(variable, "_value", None) for variable in variables]
    if any(value is None for value in values):
        return
    first = values[0]
    if not first.is_floating_point() or first.device.type != "cpu":
        return
    inputs = first.shape[-1]
    for value in values:
        if value.dtype != first.dtype or value.shape[-1] != inputs or not value.is_contiguous():
            return
    buffer = torch.empty((sum(value.numel() // inputs for value in values), inputs),
                         dtype=first.dtype)
    start = 0
    with torch.no_grad():
        for value in values:
            rows = value.numel() // inputs
            block = buffer[start : start + rows].view(value.shape)
            block.copy_(value)
            # `.data` keeps the Parameter object that Keras and torch.nn.Module track.
            value.data = block
            start += rows


def decode_products(rows, kernels):
    """`[decode_matmul(rows, kernel) for kernel in kernels]`, each kernel [outputs..., in] read
    as [prod(outputs), in]; one product when the kernels are consecutive blocks of one buffer.

    Example:
    >>> query, key, value = decode_products(rows, [query_kernel, key_kernel, value_kernel])
    """
    inputs = int(kernels[0].shape[-1])
    widths = [_rows(kernel, inputs) for kernel in kernels]
    together = _consecutive(kernels, inputs, widths)
    if together is None:
        return [decode_matmul(rows, keras.ops.reshape(kernel, (width, inputs)))
                for kernel, width in zip(kernels, widths)]
    return list(decode_matmul(rows, together).split(widths, dim=1))  # a torch tensor here


def _rows(kernel, inputs):
    # Python ints: arithmetic on a traced step's sizes would be recorded as ops.
    return math.prod(int(size) for size in kernel.shape) // int(inputs)


def _consecutive(kernels, inputs, widths):
    """The [sum(widths), inputs] view of `kernels` if they are consecutive row-major blocks of
    one storage (and, while a step is traced, inputs of the trace); else None."""
    if keras.backend.backend() != "torch":
        return None
    import torch

    first = kernels[0]
    if not all(isinstance(kernel, torch.Tensor) for kernel in kernels):
        return None
    if not _in_one_buffer(kernels):
        return None
    recorder = getattr(_tracing, "recorder", None)
    if torch.jit.is_tracing():
        # Replayed later on whatever tensors the step is given: only the step's own inputs
        # (the weights), whose places TracedStep checks before each replay, may be viewed so.
        if recorder is None or not all(id(kernel) in recorder["inputs"] for kernel in kernels):
            return None
        recorder["groups"].append(tuple(kernels))
    return torch.as_strided(first, (sum(widths), inputs), (inputs, 1), first.storage_offset())


@contextlib.contextmanager
def recording_groups(inputs):
    """While a step is traced: collects the groups of kernels viewed as one buffer, allowing
    only tensors of `inputs` (the traced step's inputs). Yields the list of groups."""
    recorder = {"inputs": {id(tensor) for tensor in inputs}, "groups": []}
    previous = getattr(_tracing, "recorder", None)
    _tracing.recorder = recorder
    try:
        yield recorder["groups"]
    finally:
        _tracing.recorder = previous


def checked_groups(groups, values):
    """`[(index, ...)]`: each recorded group as positions in `values`, for `still_consecutive`."""
    position = {id(value): index for index, value in enumerate(values)}
    return [tuple(position[id(kernel)] for kernel in group) for group in groups]


def still_consecutive(groups, values):
    """Whether every group of positions in `values` still lies in consecutive blocks of one
    storage, as when the step was traced."""
    return all(_in_one_buffer([values[index] for index in group]) for group in groups)


def _in_one_buffer(tensors):
    """Whether `tensors` (one dtype, row-major) follow each other in one storage, in order."""
    first = tensors[0]
    storage = first.untyped_storage().data_ptr()
    expected = first.data_ptr()
    for tensor in tensors:
        if (
            tensor.dtype != first.dtype
            or not tensor.is_contiguous()
            or tensor.untyped_storage().data_ptr() != storage
            or tensor.data_ptr() != expected
        ):
            return False
        expected += tensor.numel() * tensor.element_size()
    return True
