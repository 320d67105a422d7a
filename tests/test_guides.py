"""Every guide in guides/ runs and its own assertions hold, on the current backend.

The guides load Gemma 3 270M by default; here `KERAS_GEMMA_GUIDE_PRESET` points them at a
tiny random model saved as a keras_gemma preset (with the tests' tiny SentencePiece model),
so each guide costs seconds. The guides are run in this process with `runpy` rather than in
a subprocess: a fresh interpreter importing Keras and a backend would cost more than the
guide itself (export_and_serve still starts its TensorFlow subprocesses, as a user's would).
The real 270M run of each guide is by hand: `python guides/<name>.py`.
Guides with their own test module (LoRA, distributed) are run there.
"""

import os
import runpy

import keras
import pytest

GUIDES = os.path.join(os.path.dirname(__file__), os.pardir, "guides")


# export_and_serve builds its SavedModel under TensorFlow whatever the backend (JAX and PyTorch
# models go through a TensorFlow subprocess, which tests/test_export.py covers on every
# backend); the guide itself runs once, on TensorFlow, for CI time.
_EXPORT_ON_TENSORFLOW = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="export runs under TensorFlow; CI time"
)


@pytest.mark.parametrize(
    "name",
    [
        "getting_started",
        "chat",
        "loading_checkpoints",
        pytest.param("export_and_serve", marks=_EXPORT_ON_TENSORFLOW),
    ],
)
def test_guide_runs(name, tiny_preset, monkeypatch):
    monkeypatch.setenv("KERAS_GEMMA_GUIDE_PRESET", tiny_preset)
    runpy.run_path(os.path.join(GUIDES, f"{name}.py"), run_name="__main__")
    keras.backend.clear_session()


def test_every_guide_is_tested():
    """A new guide must be added to a test (here, or a module of its own)."""
    tested_here = {"getting_started", "chat", "loading_checkpoints", "export_and_serve"}
    tests = os.path.dirname(__file__)
    for filename in sorted(os.listdir(GUIDES)):
        name, extension = os.path.splitext(filename)
        if extension != ".py":
            continue
        own_test = os.path.exists(os.path.join(tests, f"test_guide_{name}.py"))
        assert name in tested_here or own_test, f"guides/{filename} is run by no test"
