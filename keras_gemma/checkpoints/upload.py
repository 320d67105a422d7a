"""`upload_preset(uri, preset_dir)`: a saved preset to Kaggle or Hugging Face, as KerasHub does.

Uploads go only through kagglehub (`model_upload`) and huggingface_hub (`upload_folder`), the
libraries that also download. Before anything is sent, the directory is checked to be a whole
preset (config.json and the weights it names), so a half-saved directory never leaves.
"""

import os

from keras_gemma.checkpoints.handles import HF_PREFIX
from keras_gemma.checkpoints.handles import KAGGLE_PREFIX
from keras_gemma.checkpoints.handles import _describe


class PresetUploadError(RuntimeError):
    """A preset could not be uploaded to Kaggle or Hugging Face."""


_UPLOAD_ADVICE = (
    "To fix it: set KAGGLE_USERNAME and KAGGLE_KEY (Kaggle) or HF_TOKEN (Hugging Face) with "
    "write access, and check that this machine can reach the hub."
)


def _check_preset(preset):
    preset = os.fspath(preset)
    config = os.path.join(preset, "config.json")
    if not os.path.isdir(preset) or not os.path.exists(config):
        raise ValueError(
            f"upload_preset: {preset!r} is not a preset directory (no config.json). Save one "
            "first with `lm.save_to_preset(directory)`."
        )
    weights = [name for name in os.listdir(preset) if name.endswith((".safetensors", ".h5"))]
    if not weights:
        raise ValueError(f"upload_preset: {preset!r} holds no weights file; save it again.")
    return preset


def upload_preset(uri, preset):
    """Uploads the preset directory `preset` to `uri`.

    `uri` is `kaggle://owner/model/framework/variation` (a new version of that Kaggle model
    variation) or `hf://user/repo` (the repository is created if it does not exist).

    Example:
    >>> lm.save_to_preset("./gemma_tuned")
    >>> keras_gemma.upload_preset("hf://me/gemma-tuned", "./gemma_tuned")
    """
    preset = _check_preset(preset)
    if not isinstance(uri, str) or not uri.startswith((KAGGLE_PREFIX, HF_PREFIX)):
        raise ValueError(
            f"upload_preset: {uri!r} is not an upload target; use "
            "kaggle://owner/model/framework/variation or hf://user/repo."
        )
    if uri.startswith(KAGGLE_PREFIX):
        handle = uri[len(KAGGLE_PREFIX):].strip("/")
        if len(handle.split("/")) != 4 or not all(handle.split("/")):
            raise ValueError(
                f"upload_preset: {uri!r} must be kaggle://owner/model/framework/variation "
                "(Kaggle numbers the versions itself)."
            )
        try:
            import kagglehub
        except ImportError:
            raise PresetUploadError(
                "uploading to Kaggle needs kagglehub: pip install 'keras-gemma[hub]'."
            ) from None
        try:
            kagglehub.model_upload(handle, preset)
        except Exception as error:  # kagglehub raises many kinds; all mean "not uploaded"
            raise PresetUploadError(
                f"could not upload {preset} to {uri} ({_describe(error)}). {_UPLOAD_ADVICE}"
            ) from error
        return
    repo = uri[len(HF_PREFIX):].strip("/")
    if repo.count("/") != 1:
        raise ValueError(f"upload_preset: {uri!r} must be hf://user/repo.")
    try:
        import huggingface_hub
    except ImportError:
        raise PresetUploadError(
            "uploading to Hugging Face needs huggingface_hub: pip install 'keras-gemma[hub]'."
        ) from None
    try:
        api = huggingface_hub.HfApi()
        api.create_repo(repo_id=repo, exist_ok=True)
        api.upload_folder(repo_id=repo, folder_path=preset)
    except Exception as error:
        raise PresetUploadError(
            f"could not upload {preset} to {uri} ({_describe(error)}). {_UPLOAD_ADVICE}"
        ) from error
