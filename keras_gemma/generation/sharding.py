"""Where generation's arrays live under a `keras.distribution` (JAX only in Keras 3.15.1)."""

import keras
import numpy as np


class GenerationSharding:
    """The layouts of generate()'s inputs and KV caches under the current distribution.

    Inputs ([batch, width] token ids and prompt masks) are split along the distribution's
    batch axis, as `fit` and `predict` split theirs. The KV caches [batch, 2, width, kv_heads,
    head_dim] are split like the attention's keys and values: their kv-heads and head_dim
    axes take the mesh axes of the key kernel (kv_heads, head_dim, hidden) in the layout map
    (our map: head_dim on the model axis), and their batch axis the batch axis. Keras places
    weights but not the arrays a compiled loop creates, and without a constraint XLA picks
    the caches' sharding itself; `constrain` fixes it at creation and after every step, so
    the while-loop's carry keeps one layout and each device holds 1/(batch x model) of the
    cache.

    The batch rule: a batch axis of n devices needs a batch that divides by n. A batch that
    does not (a single streamed prompt, 3 prompts on 2 replicas) is padded with copies of its
    last row up to the next multiple of n (with beams, up to where rows x beams divides);
    the copies cost compute on devices that would otherwise hold a replica of the same row,
    finish when that row finishes, and are cut from the output.

    `GenerationSharding.current(model)` is `UNSHARDED` without a distribution (or off JAX),
    whose methods leave everything as it is.

    Example:
    >>> with keras.distribution.ModelParallel(layout_map=layouts, batch_dim_name="batch").scope():
    ...     sharding = GenerationSharding.current(lm)
    ...     sharding.rows(3, beams=1)            # on a (2, 4) mesh
    4
    >>> sharding.cache_axes
    ('batch', None, None, None, 'model')
    """

    def __init__(self, distribution, cache_axes):
        self.distribution = distribution
        self.cache_axes = tuple(cache_axes)
        self.batch_axis = distribution.batch_dim_name
        mesh = distribution.device_mesh
        self.batch_devices = dict(zip(mesh.axis_names, mesh.shape)).get(self.batch_axis, 1)

    @classmethod
    def current(cls, model):
        if keras.backend.backend() != "jax":
            return UNSHARDED
        distribution = keras.distribution.distribution()
        if distribution is None:
            return UNSHARDED
        # The variable itself: with LoRA enabled, `key_dense.kernel` is a computed sum.
        key_dense = model.backbone.transformer_layers[0].attention.key_dense
        key_kernel = next(v for v in key_dense.weights if v.path.endswith("/kernel"))
        kernel_axes = tuple(distribution.get_variable_layout(key_kernel).axes)
        batch_axis = distribution.batch_dim_name
        # The kernel is (kv_heads, head_dim, hidden): its first two axes are the cache's
        # last two. A map that also shards weights over the batch axis cannot have that
        # axis twice in the cache, where it splits the rows.
        heads, head_dim = (None if a == batch_axis else a for a in kernel_axes[:2])
        return cls(distribution, (batch_axis, None, None, heads, head_dim))

    @property
    def key(self):
        """What identifies this layout in the Generator's compile keys."""
        mesh = self.distribution.device_mesh
        return (tuple(mesh.shape), tuple(mesh.axis_names), self.cache_axes)

    def rows_for(self, token_ids, prompt_mask, beams=1):
        """`(token_ids, prompt_mask)` padded with copies of the last row to `rows(...)`."""
        rows = self.rows(token_ids.shape[0], beams)
        return self.pad_rows(token_ids, rows), self.pad_rows(prompt_mask, rows)

    def rows(self, batch, beams=1):
        """The number of prompt rows to run so that `rows * beams` divides the batch axis."""
        rows = batch
        while (rows * beams) % self.batch_devices:
            rows += 1
        return rows

    def pad_rows(self, array, rows):
        """`array` [batch, ...] with copies of its last row appended up to `rows` rows."""
        extra = rows - array.shape[0]
        if extra <= 0:
            return array
        return np.concatenate([array, np.repeat(array[-1:], extra, axis=0)], axis=0)

    def place(self, array):
        """A numpy [rows, ...] input as a jax array split along the batch axis."""
        layout = self.distribution.get_data_layout(array.shape)
        return keras.distribution.distribute_tensor(np.asarray(array), layout)

    def place_rows(self, structure, rows):
        """Every array of `structure` whose first axis is `rows` placed as `place` does."""

        def place(value):
            shape = getattr(value, "shape", ())
            return self.place(keras.ops.convert_to_numpy(value)) if shape[:1] == (rows,) else value

        return keras.tree.map_structure(place, structure)

    def constrain(self, caches):
        """Each cache laid out as `cache_axes` (inside jit: a sharding constraint; eagerly:
        moved there)."""
        layout = keras.distribution.TensorLayout(self.cache_axes, self.distribution.device_mesh)
        return [keras.distribution.distribute_tensor(cache, layout) for cache in caches]


class _Unsharded:
    """One device (or no keras.distribution): rows as they are, tensors where the backend
    puts them."""

    key = ()

    def rows_for(self, token_ids, prompt_mask, beams=1):
        return token_ids, prompt_mask

    def place(self, array):
        return keras.ops.convert_to_tensor(array)

    def place_rows(self, structure, rows):
        return structure

    def constrain(self, caches):
        return caches


UNSHARDED = _Unsharded()
