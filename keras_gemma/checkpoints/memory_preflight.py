"""Memory preflight: refuse a load (or a quantization) that cannot fit, before allocating.

A process killed by the kernel for memory says nothing useful ("Killed", exit 137), and it
dies minutes into the load. So `from_preset` first estimates what the load will hold at its
peak and compares it with what this process may still take (`available_memory`: cgroup
limits and the host's free memory); if it does not fit, a `MemoryError` names both figures,
where the limit comes from and the ways out.

The estimate is the model's weights in the dtype they will have, plus the loader's working
set: what it holds beyond the weights while loading. Measured with benchmarks/load_memory.py
--preflight on the gemma_2b_en shape (JAX, a 2-core machine shared with other jobs; what the
load adds to a fresh process that had imported keras_gemma, 0.25 GB; three runs each):

    keras_gemma preset    weights    peak - before           estimate
    float32               10.02 GB   12.47 / 12.49 / 12.71   13.50 GB  (1.06-1.08)
    bfloat16               5.01 GB    6.73 /  7.36 /  7.36    7.13 GB  (0.97-1.06)
    int8 (quantized while  2.51 GB    3.45                    3.92 GB  (1.14)
      loading bfloat16)
    int4 (the same)        1.70 GB    3.13                    3.24 GB  (1.04)
    KerasHub preset, bfloat16  5.01 GB   7.40                 7.86 GB  (1.06)

Beyond the weights a load holds about one more copy of the tensor being assigned (the largest
is the embedding: 1.05 GB in bfloat16, 2.1 GB in float32: the array read from the file while
the backend makes its own copy; the peaks vary by ~0.6 GB from run to run, so 1.3 copies are
counted) and ~0.75 GB that the backend's runtime takes when it first runs (`RUNTIME_BYTES`).
The other checkpoint kinds hold more per tensor (`_COPIES_PER_KIND`): a KerasHub h5 file or a
transformers checkpoint is read into one array and transposed into another (measured for
KerasHub; transformers is read the same way, not measured at this size). A GGUF file is first
converted once into a float32 keras_gemma preset in the cache, which holds the whole model in
float32 twice (the model, then the arrays it is saved from: read off gguf.py and
preset_format.py, not measured). Quantizing while loading (`quantize="int8"/"int4"`) holds
the quantized weights, one kernel in float32 with its quantized copy, and about one float
copy of the embedding (its file pages and its quantized table as it is assembled).
(int8/int4 rows measured 2026-12-06, after quantizing moved to blocks of rows: they were
4.47-4.52 and 4.11 GB with whole kernels. On torch, which writes the blocks in place: int8
2.76, int4 2.12 GB, so the estimate is conservative there.)

Skip the check with `check_memory=False` (`from_preset`, `quantize`) or by setting the
environment variable KERAS_GEMMA_SKIP_MEMORY_CHECK=1, for users who know better (swap, a
limit that is not enforced, memory freed by other processes meanwhile).
"""

import dataclasses
import math
import os

from keras_gemma.config_without_tensorflow import config_of
from keras_gemma.checkpoints import quantized_loading
from keras_gemma.checkpoints.memory_available import available_memory
from keras_gemma.layers.quantization_defaults import INT4_BLOCK_SIZE

SKIP_VARIABLE = "KERAS_GEMMA_SKIP_MEMORY_CHECK"
# What the backend's runtime takes when a model is first built and assigned (XLA's client,
# thread pools, allocator arenas); measured above with JAX.
RUNTIME_BYTES = int(0.75e9)
# Copies of the largest tensor that a loader holds beside the model's weights (see above).
_COPIES_PER_KIND = {"keras_gemma": 1.3, "keras_hub": 2, "transformers": 2, "gguf": 1.3}
_FLOAT_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}
GB = 1e9


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a load needs at its peak: `weights` (kept) plus `working_set` (transient)."""

    weights: int
    working_set: int
    description: str

    @property
    def total(self):
        return self.weights + self.working_set


def skip_requested(check_memory=True):
    """Whether the caller (`check_memory=False`) or the environment skips the check."""
    value = os.environ.get(SKIP_VARIABLE, "").strip().lower()
    return not check_memory or value not in ("", "0", "false", "no")


def _float_bytes(dtype):
    return _FLOAT_BYTES.get(str(dtype), 4)


def weight_table(config):
    """`[(shape, input width or None)]` for every weight of `GemmaBackbone(**config)`: the
    input width of the kernels and the embedding (what `quantize` turns into int8/int4),
    None for the norms' scales.

    Example:
    >>> sum(math.prod(shape) for shape, _ in weight_table(config)) == \\
    ...     GemmaBackbone.parameter_count(config)
    True
    """
    hidden, head_dim = config["hidden_dim"], config["head_dim"]
    queries = config["num_query_heads"] * head_dim
    keys = config["num_key_value_heads"] * head_dim
    width = config["intermediate_dim"] // 2
    block = [
        ((queries, hidden), hidden), ((keys, hidden), hidden), ((keys, hidden), hidden),
        ((hidden, queries), queries),
        ((width, hidden), hidden), ((width, hidden), hidden), ((hidden, width), width),
    ]
    norms = 2 + bool(config.get("use_post_attention_norm")) + bool(config.get("use_post_ffw_norm"))
    block += [((hidden,), None)] * norms
    if config.get("use_query_key_norm"):
        block += [((head_dim,), None)] * 2
    return (
        [((config["vocabulary_size"], hidden), hidden)]
        + block * config["num_layers"]
        + [((hidden,), None)]
    )


def _quantized_bytes(shape, inputs, mode, scale_bytes, is_embedding):
    """Bytes of one weight after `quantize(mode)`: the int8/int4 values and their scales."""
    count = math.prod(shape)
    outputs = count // inputs
    if is_embedding:  # one int8 value per entry (also in int4 mode) and one scale per row
        return count + shape[0] * scale_bytes
    if mode == "int8":
        return count + outputs * scale_bytes
    # int4: two values a byte along the outputs, a scale and a zero point per output and
    # group of INT4_BLOCK_SIZE inputs, and a float32 index per input (int4_kernel.py).
    groups = math.ceil(inputs / INT4_BLOCK_SIZE)
    return inputs * math.ceil(outputs / 2) + groups * outputs * (scale_bytes + 1) + inputs * 4


def weight_bytes(config, dtype, quantize=None):
    """Bytes of `GemmaBackbone(**config)`'s weights in `dtype` ("float32", "bfloat16"),
    quantized to `quantize` ("int8", "int4") if given."""
    size = _float_bytes(dtype)
    total = 0
    for index, (shape, inputs) in enumerate(weight_table(config)):
        if quantize is None or inputs is None:
            total += math.prod(shape) * size
        else:
            total += _quantized_bytes(shape, inputs, quantize, size, is_embedding=index == 0)
    return total


def _largest(config):
    return max(math.prod(shape) for shape, _ in weight_table(config))


def load_estimate(config, dtype, kind="keras_gemma", quantize=None, file_bytes=0):
    """What `from_preset` of a `kind` checkpoint holds at its peak, as a `MemoryEstimate`.

    `config` holds `GemmaBackbone` arguments, `dtype` the float dtype of the loaded weights,
    `file_bytes` the checkpoint's size (a GGUF file's pages are read while it is converted).

    Example:
    >>> round(load_estimate(GEMMA_2B, "bfloat16").total / 1e9, 2)
    7.13
    """
    largest = _largest(config)
    weights = weight_bytes(config, dtype, quantize)
    if quantize is not None:
        # A block of rows in float32 in the scratch layer with its temporaries (int4 makes
        # twice int8's), and the embedding's int8 table gathered before it replaces the
        # variable (quantized_loading.py; torch writes blocks in place and needs less: the
        # estimate keeps JAX's figure, as RUNTIME_BYTES does).
        blocks = (8 if quantize == "int4" else 4) * quantized_loading.BLOCK_BYTES
        working = blocks + largest
        description = f"{quantize} weights quantized while loading"
    else:
        working = int(_COPIES_PER_KIND.get(kind, 2) * largest * _float_bytes(dtype))
        description = f"{dtype} weights"
    working += RUNTIME_BYTES
    if kind == "gguf":
        # The first load converts the file: the model in float32, the arrays it is saved from
        # and the file's pages. Loading the converted preset afterwards needs less.
        conversion = 2 * weight_bytes(config, "float32") + largest * 4 + file_bytes
        if conversion > weights + working:
            return MemoryEstimate(conversion, 0, "the GGUF file converted to float32 first")
    return MemoryEstimate(weights, working, description)


def _gb(value):
    return f"{value / GB:.1f} GB"


def check(estimate, action, ways_out, check_memory=True):
    """Raises `MemoryError` if `estimate` does not fit in `available_memory()`.

    `action` says what would run ("from_preset('gemma_2b_en', dtype='float32')"),
    `ways_out` lists alternatives with their estimates.

    Example:
    >>> check(load_estimate(config, "float32"), "from_preset('gemma_2b_en')", [])
    """
    if skip_requested(check_memory):
        return
    headroom = available_memory()
    if headroom is None or estimate.total <= headroom.bytes:
        return
    alternatives = "".join(f"{way}, " for way in ways_out)
    raise MemoryError(
        f"{action} needs about {_gb(estimate.total)} of memory ({_gb(estimate.weights)} for "
        f"{estimate.description} + {_gb(estimate.working_set)} while it runs), but this "
        f"process can take only {_gb(headroom.bytes)} more ({headroom.source}). Nothing was "
        f"allocated. Ways out: {alternatives}a smaller preset, or more memory (a higher "
        f"container limit, other processes stopped). If you know better (swap, a limit that "
        f"is not enforced), pass check_memory=False or set {SKIP_VARIABLE}=1."
    )


def load_ways_out(config, dtype, kind, quantize):
    """The cheaper loads of the same checkpoint, each with its estimate."""
    ways = []
    if quantize is None and _float_bytes(dtype) > 2:
        estimate = load_estimate(config, "bfloat16", kind)
        ways.append(f'dtype="bfloat16" (about {_gb(estimate.total)})')
    # Quantizing while loading reads keras_gemma presets (GGUF files convert to one).
    converted = "keras_gemma" if kind in ("keras_gemma", "gguf") else None
    for mode in ("int8", "int4"):
        if quantize in (None, "int8") and mode != quantize:
            estimate = load_estimate(
                config, dtype if quantize else "bfloat16", converted or "keras_gemma", mode)
            where = "" if converted else ", once `keras-gemma convert` made a keras_gemma preset"
            ways.append(f'quantize="{mode}" (about {_gb(estimate.total)}{where})')
    return ways


def check_load(handle, resolved, arguments, quantize=None, check_memory=True):
    """`from_preset`'s preflight: refuses to load `resolved` (a `loader.ResolvedPreset`) with
    `arguments` (GemmaBackbone's, from `loader.backbone_config`) if it cannot fit.

    A preset saved quantized is estimated by its file size (its weights are stored as they
    will be held).
    """
    if skip_requested(check_memory):
        return
    dtype = _policy_dtype(arguments.get("dtype"))
    if dtype is None and quantize is not None:
        return  # quantizing a quantized preset: refused by the loader with its own message
    file_bytes = _checkpoint_bytes(resolved)
    if dtype is None:  # quantized already: the file holds the weights as they will be held
        estimate = MemoryEstimate(
            file_bytes, _largest(arguments) + RUNTIME_BYTES, "the saved quantized weights")
        ways = []
    else:
        estimate = load_estimate(arguments, dtype, resolved.kind, quantize, file_bytes)
        ways = load_ways_out(arguments, dtype, resolved.kind, quantize)
    if not weights_on_host():
        # On an accelerator the weights go to its memory; the host holds what is in transit.
        estimate = dataclasses.replace(
            estimate, weights=0, description=estimate.description + " (on the accelerator)")
    options = f"dtype={dtype!r}" + (f", quantize={quantize!r}" if quantize else "")
    check(estimate, f"from_preset({_name(handle)!r}, {options})", ways)


def weights_on_host():
    """Whether the backend keeps variables in host memory (no GPU or TPU in use)."""
    import keras

    if keras.backend.backend() == "torch":
        from keras.src.backend.torch.core import get_device

        return str(get_device()).startswith("cpu")
    from keras_gemma.layers.decode_matmul import xla_runs_on_cpu

    return xla_runs_on_cpu()


def check_quantize(backbone, mode, check_memory=True):
    """`quantize(mode)`'s preflight for a float `backbone` that is already in memory: each
    layer makes its quantized variables while its float kernel is still held (the float
    ones are freed when the last layer is done), and quantizes a float32 copy of its weight
    with its temporaries. Measured on the gemma_2b_en shape (JAX): loaded in bfloat16 the
    process holds 6.0 GB; `quantize("int8")` then peaks at 13.2 GB (+7.2 GB; the estimate
    says 7.8)."""
    if skip_requested(check_memory) or mode not in ("int8", "int4") or not weights_on_host():
        return
    if any(layer.quantization_mode for layer in backbone._flatten_layers(include_self=False)):
        return  # quantized already: Keras refuses it with its own message
    import keras

    config = config_of(backbone)
    if "hidden_dim" not in config:  # Gemma3Backbone: its GemmaBackbone arguments
        config = backbone.gemma_backbone_config()
    dtype = keras.backend.standardize_dtype(backbone.variable_dtype)
    quantized = weight_bytes(config, dtype, mode)
    working = _largest(config) * (2 * 4 + _float_bytes(dtype))
    estimate = MemoryEstimate(quantized, working, f"the {mode} weights beside the float ones")
    check(estimate, f"quantize({mode!r})", [
        f'from_preset(..., quantize="{mode}"), which never holds the float model '
        f"(about {_gb(load_estimate(config, dtype, quantize=mode).total)})"
    ])


def _policy_dtype(dtype):
    """The float dtype of the loaded weights, or None for a quantized policy."""
    import keras

    if isinstance(dtype, dict):
        if dtype.get("class_name") == "DTypePolicyMap":
            return None
        dtype = keras.dtype_policies.deserialize(dtype)
    policy = keras.dtype_policies.get(dtype or keras.config.dtype_policy())
    if isinstance(policy, keras.dtype_policies.DTypePolicyMap) or policy.quantization_mode:
        return None
    return keras.backend.standardize_dtype(policy.variable_dtype)


def _checkpoint_bytes(resolved):
    if os.path.isfile(resolved.path):
        return os.path.getsize(resolved.path)
    total = 0
    for name in os.listdir(resolved.path):
        if name.endswith((".safetensors", ".h5", ".gguf", ".bin")):
            total += os.path.getsize(os.path.join(resolved.path, name))
    return total


def _name(handle):
    return getattr(handle, "path", None) or str(handle)
