"""guides/quantization.py runs on the current backend and its claims hold.

As in tests/test_guides.py, `KERAS_GEMMA_GUIDE_PRESET` points the guide at a tiny random
preset and the guide runs in this process with `runpy`; the guide asserts its own claims
(int8 perplexity within 1% of float32, a quarter of the bytes, a saved and reloaded int8
model and one quantized while loading score the same). The real Gemma 3 270M run is by
hand: `python guides/quantization.py`.
"""

import os
import runpy

import keras

GUIDE = os.path.join(os.path.dirname(__file__), os.pardir, "guides", "quantization.py")


def test_quantization_guide_runs(tiny_preset, monkeypatch):
    monkeypatch.setenv("KERAS_GEMMA_GUIDE_PRESET", tiny_preset)
    results = runpy.run_path(GUIDE, run_name="__main__")
    assert results["int4_bytes"] < results["int8_bytes"] < results["float_bytes"]
    keras.backend.clear_session()
