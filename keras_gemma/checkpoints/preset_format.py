"""keras_gemma's own preset directory: config.json, model.safetensors, tokenizer.model.

config.json:
    {"keras_gemma_format": 3,
     "backbone": {"class_name": "GemmaBackbone", "config": {...constructor arguments...}},
     "preprocessor": {"class_name": "GemmaCausalLMPreprocessor", "config": {...}} (optional),
     "task": {"class_name": "GemmaCausalLM", "config": {...}} (optional),
     "tokenizer": {"class_name": "GemmaTokenizer", "config": {"sequence_length": ...}}
         (optional: written by `tokenizer.save_to_preset`, see preset_parts.py),
     "metadata": {"instruction_tuned": bool, "stop_tokens": [...], "parameter_count": int}}
model.safetensors: every backbone variable under its Keras path, in its own dtype; dense
    kernels (out, in) since format 2 (format 1 stored them (in, out), as KerasHub does).
    Format 3 names the feed-forward projections as KerasHub does (`decoder_block_N/
    ffw_gating|ffw_gating_2|ffw_linear/kernel`); format 2 called them `decoder_block_N/
    feed_forward/gate|up|down/kernel` and is still read, its names mapped on loading.
tokenizer.model: the SentencePiece model (optional).

A save writes into a temporary sibling directory and renames it into place, so an
interrupted save never leaves a half-written preset.
"""

import functools
import inspect
import json
import os

import keras
import ml_dtypes
import numpy as np

from keras_gemma.atomic_write import atomic_directory
from keras_gemma.checkpoints import quantized_loading
from keras_gemma.checkpoints.safetensors_io import SafetensorsFile, write_safetensors
from keras_gemma.collect_once import one_collection

# Bump when the layout or the names of the saved variables change.
FORMAT_VERSION = 3
# Formats this version reads; older names are mapped by `current_variable_path`.
READABLE_FORMATS = (2, 3)
# Format 2's feed-forward names and KerasHub's (format 3 and later).
_FORMAT_2_RENAMES = (
    ("/feed_forward/gate/", "/ffw_gating/"),
    ("/feed_forward/up/", "/ffw_gating_2/"),
    ("/feed_forward/down/", "/ffw_linear/"),
)
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.model"
ALLOWED_CLASSES = {
    "backbone": ("GemmaBackbone",),
    "preprocessor": ("GemmaCausalLMPreprocessor",),
    "task": ("GemmaCausalLM",),
}

_OPTIONAL_FLOATS = {"query_pre_attn_scalar", "attention_logit_soft_cap", "final_logit_soft_cap"}
_BOOLS = {"query_head_dim_normalize", "use_post_attention_norm", "use_post_ffw_norm",
          "use_query_key_norm", "use_sliding_window_attention"}
_FLOATS = {"layer_norm_epsilon", "dropout", "local_rope_max_wavelength",
           "global_rope_max_wavelength", "local_rope_scaling_factor",
           "global_rope_scaling_factor"}


def is_keras_gemma_config(config):
    return isinstance(config, dict) and "keras_gemma_format" in config


# The dtype policies a config may name: Keras' own classes only, so that deserializing one
# can never import code named by the file.
_POLICY_CLASSES = ("DTypePolicy", "FloatDTypePolicy", "QuantizedDTypePolicy", "Int4DTypePolicy")


def _check_dtype_policy(value, where, inside_map=False):
    if value is None or isinstance(value, str):
        return
    entry = value if isinstance(value, dict) else {}
    name, config = entry.get("class_name"), entry.get("config")
    allowed = _POLICY_CLASSES if inside_map else _POLICY_CLASSES + ("DTypePolicyMap",)
    module = str(entry.get("module") or "keras")
    if (
        name not in allowed
        or entry.get("registered_name")
        or not (module == "keras" or module.startswith("keras."))
        or not isinstance(config, dict)
    ):
        raise ValueError(
            f"{where}: the backbone's dtype must be a dtype name or one of Keras' dtype "
            f"policies {allowed}; got {value!r}. Write it as a name such as \"float32\" or "
            "\"bfloat16\": keras_gemma imports no other class named by a preset."
        )
    if name == "DTypePolicyMap":
        _check_dtype_policy(config.get("default_policy"), where, inside_map=True)
        policies = config.get("policy_map")
        if not isinstance(policies, dict):
            raise ValueError(f"{where}: a DTypePolicyMap needs a policy_map object.")
        for policy in policies.values():
            _check_dtype_policy(policy, where, inside_map=True)


def validate_backbone_config(config, where="config.json"):
    """Checks GemmaBackbone arguments: known keys, right types. Returns them."""
    from keras_gemma.backbone import GemmaBackbone

    if not isinstance(config, dict):
        raise ValueError(f"{where}: the backbone config must be a JSON object.")
    accepted = set(inspect.signature(GemmaBackbone.__init__).parameters) - {"self", "kwargs"}
    accepted |= {"name", "trainable"}
    unknown = sorted(set(config) - accepted)
    if unknown:
        raise ValueError(
            f"{where}: unknown backbone arguments {unknown}; GemmaBackbone accepts "
            f"{sorted(accepted - {'name', 'trainable'})}."
        )
    for key, value in config.items():
        if key == "dtype":
            _check_dtype_policy(value, where)
            continue
        if key in ("name", "trainable"):
            continue
        if key in _BOOLS:
            ok = isinstance(value, bool)
            wanted = "true or false"
        elif key in _OPTIONAL_FLOATS:
            ok = value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))
            wanted = "a number or null"
        elif key in _FLOATS:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            wanted = "a number"
        else:
            ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
            wanted = "a positive integer"
        if not ok:
            raise ValueError(f"{where}: backbone argument {key!r} must be {wanted}, got {value!r}.")
    return config


def _numpy(variable):
    value = variable.value if hasattr(variable, "value") else variable
    if keras.backend.standardize_dtype(variable.dtype) == "bfloat16":
        as_float = keras.ops.convert_to_numpy(keras.ops.cast(value, "float32"))
        return np.asarray(as_float).astype(ml_dtypes.bfloat16)
    return np.asarray(keras.ops.convert_to_numpy(value))


def backbone_tensors(backbone):
    """`{variable path: numpy array}` for every variable of the backbone.

    A layer with LoRA enabled is saved as Keras saves it (and so KerasHub's presets hold it):
    its kernel with the LoRA update merged in, and no LoRA factors, so the preset loads into
    a plain model. `save_lora_weights` keeps the factors on their own.
    """
    merged = {}
    for layer in backbone._flatten_layers(include_self=False):
        if getattr(layer, "lora_enabled", False) and not getattr(layer, "quantization_mode", None):
            # `layer.kernel` is the base kernel plus the scaled product of the factors.
            merged[layer._kernel.path] = layer.kernel
            merged[layer.lora_kernel_a.path] = None
            merged[layer.lora_kernel_b.path] = None
    tensors = {}
    for variable in backbone.weights:
        if variable.path in tensors:
            raise ValueError(f"two variables share the path {variable.path!r}.")
        value = merged.get(variable.path, variable)
        if value is not None:
            tensors[variable.path] = _numpy(value)
    return tensors


def save_preset(
    directory,
    backbone,
    tokenizer_proto=None,
    preprocessor_config=None,
    task_config=None,
    metadata=None,
):
    """Writes a preset directory atomically; replaces an earlier keras_gemma preset there."""
    directory = os.path.abspath(os.fspath(directory))
    with atomic_directory(directory, marker=CONFIG_FILE, description="a preset") as staging:
        config = {
            "keras_gemma_format": FORMAT_VERSION,
            "backbone": {"class_name": "GemmaBackbone", "config": backbone.get_config()},
            "metadata": dict(metadata or {}),
        }
        if preprocessor_config is not None:
            config["preprocessor"] = {
                "class_name": "GemmaCausalLMPreprocessor",
                "config": preprocessor_config,
            }
        if task_config is not None:
            config["task"] = {"class_name": "GemmaCausalLM", "config": task_config}
        write_safetensors(
            os.path.join(staging, WEIGHTS_FILE),
            backbone_tensors(backbone),
            metadata={"format": "keras_gemma"},
        )
        if tokenizer_proto is not None:
            with open(os.path.join(staging, TOKENIZER_FILE), "wb") as file:
                file.write(tokenizer_proto)
        from keras_gemma.checkpoints.preset_parts import keep_parts

        keep_parts(directory, staging, config)  # a tokenizer saved on its own stays
        with open(os.path.join(staging, CONFIG_FILE), "w") as file:
            json.dump(config, file, indent=2)
    return directory


def current_variable_path(path):
    """The variable path of this version for a path saved by format 2 or later.

    Example:
    >>> current_variable_path("decoder_block_0/feed_forward/up/kernel")
    'decoder_block_0/ffw_gating_2/kernel'
    """
    for old, new in _FORMAT_2_RENAMES:
        path = path.replace(old, new)
    return path


def check_format_version(config, where):
    """Refuses a preset written in a keras_gemma format this version cannot read."""
    version = config.get("keras_gemma_format")
    if version not in READABLE_FORMATS:
        newer = isinstance(version, int) and version > FORMAT_VERSION
        advice = (
            "It was written by a newer keras_gemma: upgrade keras_gemma."
            if newer
            else "Format 1 stored dense kernels (in, out); they are (out, in) now. Convert it "
            "again from its source checkpoint with this version."
        )
        raise ValueError(
            f"{where}: this preset is in keras_gemma format {version!r}, and this version of "
            f"keras_gemma reads formats {list(READABLE_FORMATS)}. {advice}"
        )


def check_class(config, section, where):
    entry = config.get(section)
    if entry is None:
        return None
    class_name = entry.get("class_name") if isinstance(entry, dict) else None
    if class_name not in ALLOWED_CLASSES[section]:
        raise ValueError(
            f"{where}: the {section} class {class_name!r} is not one of keras_gemma's Gemma "
            f"classes {ALLOWED_CLASSES[section]}; refusing to load it (nothing was imported)."
        )
    return entry.get("config") or {}


def _numpy_dtype(variable):
    name = str(variable.dtype)
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def load_weights(backbone, directory):
    """Fills `backbone` from model.safetensors, tensor by tensor."""
    path = os.path.join(directory, WEIGHTS_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{directory} has no {WEIGHTS_FILE}.")
    from keras_gemma.checkpoints.huggingface import assign_checked

    weights = SafetensorsFile(path)
    variables = {variable.path: variable for variable in backbone.weights}
    stored = {current_variable_path(name): name for name in weights.keys()}
    # Layers built quantized whose float weight the file holds: quantized as they are read.
    to_quantize = {
        float_path: layer
        for float_path, layer in quantized_loading.quantized_layers(backbone).items()
        if float_path in stored and weights[stored[float_path]].dtype.kind not in "iu"
    }
    for layer in to_quantize.values():
        for variable in layer.weights:
            variables.pop(variable.path)
    missing = sorted(set(variables) - set(stored) - set(to_quantize))
    if missing:
        raise ValueError(f"{path} lacks the weights {missing[:5]}.")
    extra = sorted(set(stored) - set(variables) - set(to_quantize))
    if extra:
        raise ValueError(
            f"{path} holds weights the model does not have: {extra[:5]}. Does config.json "
            "match the weights?"
        )
    for path_now, variable in variables.items():
        name = stored[path_now]
        if tuple(weights[name].shape) != tuple(variable.shape):
            assign_checked(variable, weights[name], name)  # raises, naming both shapes
        # An owned copy, never the memory map itself: a backend may alias the array it is
        # given (JAX does on CPU) and later write into it.
        assign_checked(variable, weights.read(name, dtype=_numpy_dtype(variable)), name)
    # One garbage collection for the whole model, not one per layer (Keras collects each time
    # a scratch layer's `quantize` drops its float kernel).
    with one_collection():
        for float_path, layer in to_quantize.items():
            name = stored[float_path]
            quantized_loading.fill(
                layer, functools.partial(weights.read_rows, name, dtype=np.float32),
                rows=weights[name].shape[0],
            )
    return backbone
