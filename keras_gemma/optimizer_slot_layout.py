"""Optimizer slots stored in the same memory order as the variables they follow (torch).

On torch on a CPU, `decode_matmul.lay_out_for_decode` stores some float32 kernels
column-major (the tied embedding, query, gating: faster decoding). torch's autograd gives
such a variable a gradient in its own memory order, but Keras creates every optimizer slot
(Adam's momentum and velocity, ...) row-major. Each elementwise update then mixes the two
orders, and torch runs mixed-stride elementwise ops several times slower than matching ones.
Measured on the 2-core EPYC (AVX-512, 2026-12-05, torch 2.13, small full fit: 4 layers,
vocabulary 16,384, hidden 512, batch 4 x 128, AdamW): the embedding's one `add_` took
13.6 ms a step and its `grad * grad` 18.7 ms, where a matching-order op over the same
33 MB takes about 2 ms; the whole step lost ~10% to this.

`lay_out_slots_like_variables` gives each slot of a variable stored in a non-row-major
order that variable's strides (values unchanged), once per optimizer and set of slots.
"""

import weakref

import keras

# Optimizer -> number of its variables when its slots were last laid out.
_laid_out = weakref.WeakKeyDictionary()


def lay_out_slots_like_variables(optimizer, trainable_variables):
    """Stores each optimizer slot of a non-row-major torch variable in that variable's order.

    Slots are matched to their variable by Keras' naming (`add_variable_from_reference`
    names a slot `<variable path with "/" as "_">_<slot name>`) and by shape. Does nothing
    on other backends, before the optimizer is built, or when nothing changed since the
    last call.

    Example:
    >>> lay_out_slots_like_variables(model.optimizer, model.trainable_variables)
    """
    if keras.backend.backend() != "torch" or optimizer is None or not optimizer.built:
        return
    import torch

    if torch.compiler.is_compiling():
        return
    count = len(optimizer.variables)
    if _laid_out.get(optimizer) == count:
        return
    references = {}
    for variable in trainable_variables:
        value = getattr(variable, "_value", None)
        if value is not None and value.dim() > 1 and not value.is_contiguous():
            references[variable.path.replace("/", "_") + "_"] = value
    if references:
        for slot in optimizer.variables:
            slot_value = getattr(slot, "_value", None)
            if slot_value is None:
                continue
            for prefix, value in references.items():
                if (
                    slot.name.startswith(prefix)
                    and slot_value.shape == value.shape
                    and slot_value.stride() != value.stride()
                ):
                    laid_out = torch.empty_strided(
                        value.shape, value.stride(), dtype=slot_value.dtype,
                        device=slot_value.device,
                    )
                    with torch.no_grad():
                        laid_out.copy_(slot_value)
                        # `.data` keeps the Parameter object that Keras tracks.
                        slot_value.data = laid_out
                    break
    _laid_out[optimizer] = count
