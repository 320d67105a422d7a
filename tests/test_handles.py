"""Remote handles fail fast and clearly when the hubs cannot be reached.

No test here contacts Kaggle or Hugging Face: huggingface_hub runs with its own offline
switch (HF_HUB_OFFLINE=1), kagglehub is pointed at its local test endpoint (a refused port
on this machine) or its download function is patched.
"""

import os
import subprocess
import sys
import time

import pytest

from keras_gemma import GemmaBackbone
from keras_gemma.checkpoints import handles


def _offline_environment(tmp_path):
    environment = dict(os.environ)
    environment.update(
        HF_HUB_OFFLINE="1",
        KAGGLE_API_ENVIRONMENT="TEST",  # kagglehub's localhost:7777: refused at once
        KAGGLEHUB_CACHE=str(tmp_path / "kaggle"),
        HF_HOME=str(tmp_path / "hf"),
    )
    for name in ("KAGGLE_USERNAME", "KAGGLE_KEY", "HF_TOKEN"):
        environment.pop(name, None)
    return environment


def test_preset_name_offline_fails_within_seconds_with_what_to_do(tmp_path):
    script = (
        "import keras_gemma\n"
        "try:\n"
        "    keras_gemma.GemmaBackbone.from_preset('gemma_2b_en')\n"
        "except Exception as error:\n"
        "    print('ERROR', type(error).__name__, error)\n"
    )
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", script],
        env=_offline_environment(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    elapsed = time.monotonic() - started
    output = result.stdout
    assert "ERROR PresetDownloadError" in output, output + result.stderr
    assert "accept the Gemma license" in output
    assert "KAGGLE_USERNAME" in output and "HF_TOKEN" in output
    assert "local directory" in output
    # Python, keras and the backend take a few seconds to import; the failure itself must
    # not wait on a network timeout.
    assert elapsed < 60, elapsed


def test_license_not_accepted_is_explained(monkeypatch):
    import kagglehub

    def refuse(*args, **kwargs):
        raise PermissionError("403 Client Error: Forbidden (license not accepted)")

    monkeypatch.setattr(kagglehub, "model_download", refuse)
    with pytest.raises(handles.PresetDownloadError, match="accept the Gemma license"):
        GemmaBackbone.from_preset("kaggle://keras/gemma/keras/gemma_2b_en/3")


def test_hf_handle_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    import huggingface_hub.constants as hf_constants

    # huggingface_hub reads the switch at import; patch its constant for this process.
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(handles.PresetDownloadError, match="HF_TOKEN"):
        GemmaBackbone.from_preset("hf://google/gemma-2b")


@pytest.mark.parametrize(
    "handle, message",
    [
        ("kaggle://keras/gemma", "not a Kaggle model handle"),
        ("hf://gemma-2b", "not a Hugging Face handle"),
        ("gemma_2b", "unknown preset"),
        ("/no/such/dir", "unknown preset"),
    ],
)
def test_malformed_handles(handle, message):
    with pytest.raises(ValueError, match=message):
        GemmaBackbone.from_preset(handle)
