"""LoRA on a Gemma backbone: enable it, save and load only the adapter weights.

The factors are Keras' own (`EinsumDense.enable_lora`): `lora_kernel_a` has the kernel's
leading axes and `lora_kernel_b` its last axis, whatever the kernel's layout, so `a @ b`
is a rank-`rank` update of the kernel.
"""

import keras


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

    def _lora_variables(self):
        variables = [v for v in self.weights if v.name in ("lora_kernel_a", "lora_kernel_b")]
        if not variables:
            raise ValueError("This backbone has no LoRA weights; call enable_lora(rank) first.")
        return variables

    def save_lora_weights(self, filepath):
        """Writes only the LoRA variables, by path: `.h5` as HDF5, anything else safetensors."""
        tensors = {v.path: keras.ops.convert_to_numpy(v) for v in self._lora_variables()}
        filepath = str(filepath)
        if filepath.endswith(".h5"):
            import h5py

            with h5py.File(filepath, "w") as file:
                for path, value in tensors.items():
                    file.create_dataset(path, data=value)
        else:
            from keras_gemma.checkpoints.safetensors_io import write_safetensors

            write_safetensors(filepath, tensors)

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
