"""Whether this thread is recording a decode step for Inductor (torch_compiled_step.py).

Some products are recorded differently for Inductor than for `torch.jit.trace`'s step:
oneDNN's as an opaque operator (torch_onednn_product.py: Inductor lowers
`mkldnn._linear_pointwise` only for weights it holds as constants, and the step passes its
weights in; an operator it does not know it calls as it is), one-row products as a multiply
and a sum that Inductor compiles into its own loop (one_row_product.py). Per thread: one
thread recording must not change what another thread's layers do meanwhile.

Example:
>>> with inductor_recording.on():
...     graph = make_fx(step)(*inputs)
"""

from keras_gemma.layers.thread_flag import ThreadFlag

_recording = ThreadFlag()


def on():
    """A context within which this thread's products are recorded for Inductor."""
    return _recording.raised()


def is_on():
    return _recording.is_raised()
