"""The tokenizer and preprocessor parts of a keras_gemma preset, saved on their own.

KerasHub's conversion script saves a model and its tokenizer separately into one directory
(`backbone.save_to_preset(d); tokenizer.save_to_preset(d)`). These writers add or replace
the tokenizer (`tokenizer.model`, and config.json's section
`"tokenizer": {"class_name": "GemmaTokenizer", "config": {"sequence_length": ...}}`) and the
preprocessor's settings (`"preprocessor": {"class_name": "GemmaCausalLMPreprocessor",
"config": {"sequence_length", "add_start_token", "add_end_token"}}`) and leave the rest of
the preset as it is. `preset_format.save_preset` in turn calls `keep_parts`, so a backbone
saved after the tokenizer keeps it.

The preset is written whole: assembled in a temporary sibling directory (the files that do
not change hard-linked into it) and renamed into place, so a crash leaves the old preset.

Example:
```python
save_tokenizer("./my_gemma", tokenizer)        # tokenizer.model + config.json
save_preprocessor("./my_gemma", preprocessor)  # the same, plus the preprocessor section
```
"""

import json
import os
import shutil

from keras_gemma.atomic_write import atomic_directory, recover_interrupted_write
from keras_gemma.checkpoints import preset_format

TOKENIZER_SECTION = "tokenizer"
PREPROCESSOR_SECTION = "preprocessor"
# Gemma3Tokenizer is GemmaTokenizer with KerasHub's Gemma 3 bookkeeping: the same file.
_TOKENIZER_CLASSES = ("GemmaTokenizer", "Gemma3Tokenizer")
_PREPROCESSOR_CLASS = "GemmaCausalLMPreprocessor"
_TOKENIZER_KEYS = ("sequence_length", "has_vision_tokens")


def _tokenizer_section(tokenizer):
    name = type(tokenizer).__name__
    name = name if name in _TOKENIZER_CLASSES else _TOKENIZER_CLASSES[0]
    config = {"sequence_length": tokenizer.sequence_length}
    if hasattr(tokenizer, "has_vision_tokens"):  # Gemma3Tokenizer's vocabulary switch
        config["has_vision_tokens"] = tokenizer.has_vision_tokens
    return {"class_name": name, "config": config}


def save_tokenizer(directory, tokenizer):
    """Adds `tokenizer` (its model file and settings) to the preset in `directory`."""
    return _update_preset(
        directory,
        tokenizer.proto,
        {TOKENIZER_SECTION: _tokenizer_section(tokenizer)},
    )


def save_preprocessor(directory, preprocessor):
    """Adds the preprocessor's settings and its tokenizer to the preset in `directory`."""
    settings = {
        "sequence_length": preprocessor.sequence_length,
        "add_start_token": preprocessor.add_start_token,
        "add_end_token": preprocessor.add_end_token,
    }
    sections = {
        TOKENIZER_SECTION: _tokenizer_section(preprocessor.tokenizer),
        PREPROCESSOR_SECTION: {"class_name": _PREPROCESSOR_CLASS, "config": settings},
    }
    return _update_preset(directory, preprocessor.tokenizer.proto, sections)


def saved_tokenizer_config(resolved):
    """The tokenizer settings a keras_gemma preset saved (`{}` for any other preset)."""
    if resolved.kind != "keras_gemma":
        return {}
    where = os.path.join(resolved.path, preset_format.CONFIG_FILE)
    entry = resolved.config.get(TOKENIZER_SECTION)
    if entry is None:
        return {}
    class_name = entry.get("class_name") if isinstance(entry, dict) else None
    if class_name not in _TOKENIZER_CLASSES:
        raise ValueError(
            f"{where}: the tokenizer class {class_name!r} is not one of keras_gemma's "
            f"{_TOKENIZER_CLASSES}; refusing to load it (nothing was imported)."
        )
    config = entry.get("config") or {}
    unknown = sorted(set(config) - set(_TOKENIZER_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown tokenizer settings {unknown}.")
    return dict(config)


def keep_parts(directory, staging, config):
    """Carries the tokenizer and preprocessor of the preset in `directory` over into the one
    being assembled in `staging` (whose config.json will be `config`), unless the new save
    writes a tokenizer of its own: a backbone saved after its tokenizer keeps it, as in
    KerasHub, where each part is a file of its own.
    """
    if os.path.exists(os.path.join(staging, preset_format.TOKENIZER_FILE)):
        return  # a new tokenizer: the old settings describe the old one
    try:
        old = _read_config(directory)
    except (OSError, ValueError):
        return  # not a readable preset: it is replaced whole, as before
    if old is None:
        return
    source = os.path.join(directory, preset_format.TOKENIZER_FILE)
    if os.path.exists(source):
        shutil.copyfile(source, os.path.join(staging, preset_format.TOKENIZER_FILE))
        for section in (TOKENIZER_SECTION, PREPROCESSOR_SECTION):
            if section in old and section not in config:
                config[section] = old[section]


def _read_config(directory):
    """config.json of a keras_gemma preset; None where there is none."""
    path = os.path.join(directory, preset_format.CONFIG_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as file:
        try:
            config = json.load(file)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from None
    return config if preset_format.is_keras_gemma_config(config) else None


def _write_parts(directory, proto, config):
    with open(os.path.join(directory, preset_format.TOKENIZER_FILE), "wb") as file:
        file.write(proto)
    with open(os.path.join(directory, preset_format.CONFIG_FILE), "wb") as file:
        file.write(json.dumps(config, indent=2).encode("utf-8"))


def _link_or_copy(source, target):
    try:
        os.link(source, target)  # the same bytes, no copy of gigabytes of weights
    except OSError:
        shutil.copy2(source, target)


def _carry_over(directory, staging, replaced):
    """Puts every entry of `directory` except `replaced` into `staging`, as hard links."""
    for name in os.listdir(directory):
        if name in replaced:
            continue
        source, target = os.path.join(directory, name), os.path.join(staging, name)
        if os.path.isdir(source) and not os.path.islink(source):
            shutil.copytree(source, target, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(source, target)


def _update_preset(directory, proto, sections):
    directory = os.path.abspath(os.fspath(directory))
    # A save killed between its renames left the preset aside: back first, then kept.
    recover_interrupted_write(directory)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"{directory} exists and is not a directory.")
    config = None
    if os.path.isdir(directory) and os.listdir(directory):
        config = _read_config(directory)
        if config is None:
            what = (
                "a KerasHub or transformers preset"
                if os.path.exists(os.path.join(directory, preset_format.CONFIG_FILE))
                else "not a preset"
            )
            raise ValueError(
                f"{directory} exists and is {what}: refusing to write a keras_gemma tokenizer "
                "into it. Choose an empty or new directory, or a keras_gemma preset."
            )
    # The whole preset is assembled beside its place and renamed into it, so that a crash
    # leaves the old preset, never a new tokenizer.model beside the old config.json; the
    # files that do not change are carried over as hard links.
    marker = preset_format.CONFIG_FILE
    with atomic_directory(directory, marker=marker, description="a preset") as staging:
        if config is None:
            config = {"keras_gemma_format": preset_format.FORMAT_VERSION, "metadata": {}}
        else:
            replaced = (preset_format.TOKENIZER_FILE, preset_format.CONFIG_FILE)
            _carry_over(directory, staging, replaced)
        config.update(sections)
        _write_parts(staging, proto, config)
    return directory
