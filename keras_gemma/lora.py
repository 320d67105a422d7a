"""LoRA on a Gemma backbone: enable it, save and load only the adapter weights.

The factors are Keras' own (`EinsumDense.enable_lora`): `lora_kernel_a` has the kernel's
leading axes and `lora_kernel_b` its last axis, whatever the kernel's layout, so `a @ b`
is a rank-`rank` update of the kernel. Our kernels are stored (out, in), so for the query,
key, value and feed-forward projections `b` is the input-side factor (peft's `lora_A`) and
`a` the output-side one (peft's `lora_B`). After `model.quantize("int8")`, the LoRA term runs
through `GemmaEinsumDense` (layers/lora_einsum.py), which never forms the full `a @ b`.

Memory: Keras builds optimizer slots for `trainable_variables` only and differentiates with
respect to them only, so the frozen base weights get neither slots nor gradients.
"""

import keras
from keras import ops

from keras_gemma.collect_once import one_collection


class LoraMethods:
    """`enable_lora`, `save_lora_weights` and `load_lora_weights` for `GemmaBackbone`.

    Example:
    >>> backbone.enable_lora(rank=4)
    >>> backbone.save_lora_weights("adapter.safetensors")
    """

    def enable_lora(self, rank, target_layer_names=("query", "value")):
        """Freezes the backbone and adds rank-`rank` LoRA factors to the named projections.

        Uses Keras' own `EinsumDense.enable_lora`: afterwards only the `lora_kernel_a` /
        `lora_kernel_b` variables of the target layers are trainable. The default targets
        are every attention block's query and value projections, as in KerasHub.

        Example:
        >>> backbone.enable_lora(rank=4)
        >>> sorted({v.path.split("/")[-1] for v in backbone.trainable_variables})
        ['lora_kernel_a', 'lora_kernel_b']
        """
        targets = [
            layer
            for layer in self._flatten_layers(include_self=False)
            if layer.name in target_layer_names and hasattr(layer, "enable_lora")
        ]
        if not targets:
            raise ValueError(f"No layer named one of {list(target_layer_names)} supports LoRA.")
        self.trainable = True
        for layer in self._flatten_layers(include_self=False):
            layer.trainable = False
        for layer in targets:
            layer.trainable = True  # before enable_lora, which then freezes the kernel
            layer.enable_lora(rank)

    def merge_lora(self):
        """Folds each LoRA update into its kernel and removes the LoRA variables.

        Float kernels become `kernel + alpha / rank * a @ b` (summed in float32, stored in the
        kernel's dtype); int8 kernels are dequantized, updated and requantized with a new
        scale (Keras' `_get_kernel_with_merged_lora`, as Keras does when saving). Afterwards
        the backbone is a plain model again: no LoRA variables, every layer trainable, the
        same logits (up to requantization for int8), ready for `save_to_preset` or export.
        `compile()` again before training it further.

        Example:
        >>> backbone.enable_lora(rank=4)
        >>> lm.fit(data)
        >>> backbone.merge_lora()
        >>> [v.name for v in backbone.weights if "lora" in v.name]
        []
        """
        layers = [
            layer
            for layer in self._flatten_layers(include_self=False)
            if getattr(layer, "lora_enabled", False)
        ]
        if not layers:
            raise ValueError("This backbone has no LoRA weights to merge; enable_lora first.")
        with one_collection():  # Keras collects garbage each time a layer drops a variable
            for layer in layers:
                _merge_layer(layer)
        for layer in self._flatten_layers(include_self=True):
            layer.trainable = True

    def _lora_variables(self):
        variables = [v for v in self.weights if v.name in ("lora_kernel_a", "lora_kernel_b")]
        if not variables:
            raise ValueError("This backbone has no LoRA weights; call enable_lora(rank) first.")
        return variables

    def save_lora_weights(self, filepath):
        """Writes only the LoRA variables, by path: `.h5` as HDF5, anything else safetensors."""
        tensors = {v.path: keras.ops.convert_to_numpy(v) for v in self._lora_variables()}
        filepath = str(filepath)
        from keras_gemma.atomic_write import atomic_file

        # Written whole beside its place, then renamed: a crash leaves the earlier file.
        with atomic_file(filepath) as staging:
            if filepath.endswith(".h5"):
                import h5py

                with h5py.File(staging, "w") as file:
                    for path, value in tensors.items():
                        file.create_dataset(path, data=value)
            else:
                from keras_gemma.checkpoints.safetensors_io import write_safetensors

                write_safetensors(staging, tensors)

    def load_lora_weights(self, filepath):
        """Reads weights written by `save_lora_weights` (enable_lora with the same rank first)."""
        filepath = str(filepath)
        if filepath.endswith(".h5"):
            import h5py

            tensors = {}

            def collect(name, item):
                if isinstance(item, h5py.Dataset):
                    tensors[name] = item[()]

            with h5py.File(filepath, "r") as file:
                file.visititems(collect)
        else:
            from keras_gemma.checkpoints.safetensors_io import read_safetensors

            tensors = read_safetensors(filepath)
        variables = self._lora_variables()
        missing = sorted({v.path for v in variables} - set(tensors))
        if missing or len(tensors) != len(variables):
            raise ValueError(
                f"{filepath} does not hold this backbone's LoRA weights (missing: {missing[:3]}, "
                f"file has {len(tensors)} tensors, model {len(variables)})."
            )
        for variable in variables:
            value = tensors[variable.path]
            if tuple(value.shape) != tuple(variable.shape):
                raise ValueError(
                    f"{variable.path}: shape {tuple(value.shape)} in {filepath}, "
                    f"{tuple(variable.shape)} in the model (a different LoRA rank?)."
                )
            variable.assign(value)


def _merge_layer(layer):
    mode = layer.quantization_mode
    if mode is None:
        update = ops.matmul(layer.lora_kernel_a, layer.lora_kernel_b)
        scale = layer.lora_alpha / layer.lora_rank
        merged = ops.add(ops.cast(layer._kernel, "float32"), scale * update)
        layer._kernel.assign(ops.cast(merged, layer._kernel.dtype))
        layer._kernel.trainable = True  # enable_lora froze it
    elif mode == "int8":
        kernel, scale, _ = layer._get_kernel_with_merged_lora()
        layer._kernel.assign(kernel)
        layer.kernel_scale.assign(scale)
    else:
        raise NotImplementedError(
            f"merge_lora: {layer.name} is quantized as {mode}; float and int8 kernels only."
        )
    # Layer.__delattr__ untracks the variables (and, on torch, the module parameters).
    del layer.lora_kernel_a
    del layer.lora_kernel_b
    layer.lora_enabled = False
    layer.lora_rank = None
