"""One entry point that turns a handle into a GemmaBackbone."""

import json
import os

from keras_gemma.checkpoints import huggingface


def read_json(path):
    try:
        with open(path) as file:
            return json.load(file)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None


def load_backbone(handle, dtype=None, load_weights=True):
    """A GemmaBackbone from a checkpoint directory.

    Reads a transformers directory (config.json with a Gemma `model_type`, safetensors).
    """
    from keras_gemma.backbone import GemmaBackbone

    handle = os.fspath(handle)
    if not os.path.isdir(handle):
        raise ValueError(
            f"{handle!r} is not a directory. GemmaBackbone.from_preset reads a transformers "
            "checkpoint directory (config.json and model.safetensors)."
        )
    config_path = os.path.join(handle, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{handle} has no config.json.")
    config = read_json(config_path)
    if not huggingface.is_transformers_config(config):
        raise ValueError(
            f"{config_path} is not a transformers Gemma config (model_type "
            f"{config.get('model_type')!r})."
        )
    arguments = huggingface.backbone_config_from_transformers(config)
    backbone = GemmaBackbone(**arguments, dtype=dtype)
    if load_weights:
        huggingface.load_transformers_weights(backbone, handle)
    return backbone
