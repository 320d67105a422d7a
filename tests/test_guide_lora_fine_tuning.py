"""guides/lora_fine_tuning.py runs on the current backend, and its loss goes down.

As in tests/test_guides.py, `KERAS_GEMMA_GUIDE_PRESET` points the guide at a tiny random
preset and the guide runs in this process with `runpy`: the guide's own asserts (loss went
down, the reloaded adapter gives the same logits and answer) hold, and this test checks its
results again. The real Gemma 3 270M run is by hand: `python guides/lora_fine_tuning.py`.
"""

import os
import runpy

import keras

GUIDE = os.path.join(os.path.dirname(__file__), os.pardir, "guides", "lora_fine_tuning.py")


def test_lora_fine_tuning_guide_runs_and_loss_goes_down(tiny_preset, monkeypatch):
    monkeypatch.setenv("KERAS_GEMMA_GUIDE_PRESET", tiny_preset)
    results = runpy.run_path(GUIDE, run_name="__main__")
    losses = results["losses"]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert results["trainable"] < results["lm"].count_params() / 10
    assert os.path.getsize(results["adapter"]) > 0
    keras.backend.clear_session()
