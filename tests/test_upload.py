"""upload_preset: checks before sending, the hub calls it makes, and its offline error."""

import pytest

import keras_gemma
from keras_gemma import GemmaBackbone
from keras_gemma.checkpoints import upload
from conftest import tiny_config

TINY = tiny_config(
    vocabulary_size=64,
    num_layers=1,
    num_query_heads=2,
    num_key_value_heads=1,
    hidden_dim=16,
    intermediate_dim=32,
)


@pytest.fixture
def saved(tmp_path):
    directory = str(tmp_path / "preset")
    GemmaBackbone(**TINY).save_to_preset(directory)
    return directory


def test_refuses_what_is_not_a_preset(tmp_path, saved):
    with pytest.raises(ValueError, match="not a preset directory"):
        keras_gemma.upload_preset("hf://me/gemma", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="not an upload target"):
        keras_gemma.upload_preset("https://example.com/gemma", saved)
    with pytest.raises(ValueError, match="kaggle://owner/model/framework/variation"):
        keras_gemma.upload_preset("kaggle://me/gemma/keras/tuned/2", saved)


def test_kaggle_upload_hands_the_directory_to_kagglehub(saved, monkeypatch):
    import kagglehub

    calls = []
    monkeypatch.setattr(kagglehub, "model_upload", lambda handle, path: calls.append((handle, path)))
    keras_gemma.upload_preset("kaggle://me/gemma/keras/tuned", saved)
    assert calls == [("me/gemma/keras/tuned", saved)]


def test_hugging_face_upload_creates_the_repo_then_uploads(saved, monkeypatch):
    import huggingface_hub

    calls = []

    class FakeApi:
        def create_repo(self, repo_id, exist_ok):
            calls.append(("create", repo_id, exist_ok))

        def upload_folder(self, repo_id, folder_path):
            calls.append(("upload", repo_id, folder_path))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    keras_gemma.upload_preset("hf://me/gemma-tuned", saved)
    assert calls == [("create", "me/gemma-tuned", True), ("upload", "me/gemma-tuned", saved)]


def test_offline_upload_says_what_to_do(saved, monkeypatch):
    import huggingface_hub

    class OfflineApi:
        def create_repo(self, repo_id, exist_ok):
            raise OSError("Network is unreachable")

    monkeypatch.setattr(huggingface_hub, "HfApi", OfflineApi)
    with pytest.raises(upload.PresetUploadError, match="Network is unreachable.*HF_TOKEN"):
        keras_gemma.upload_preset("hf://me/gemma-tuned", saved)
