"""quantize and merge_lora walk the process's old objects once, not once per layer."""

import gc

from conftest import tiny_config
from keras_gemma import GemmaBackbone
from keras_gemma import GemmaCausalLM
from keras_gemma.collect_once import one_collection


def _full_collections(action):
    """Freeze counts seen by each full collection during `action()`: 0 means it walked
    every object in the process."""
    seen = []

    def record(phase, info):
        if phase == "start" and info["generation"] == 2:
            seen.append(gc.get_freeze_count())

    gc.callbacks.append(record)
    try:
        action()
    finally:
        gc.callbacks.remove(record)
    return seen


def test_quantize_and_merge_lora_walk_old_objects_once():
    lm = GemmaCausalLM(GemmaBackbone(**tiny_config()))
    lm.backbone.enable_lora(rank=2)
    for action in (lambda: lm.merge_lora(), lambda: lm.quantize("int8")):
        seen = _full_collections(action)
        # Keras collected once per dropped variable (so there is something to save) ...
        assert len(seen) > 2
        # ... and all but the last collection skipped the objects older than the action.
        assert seen.count(0) == 1 and seen[-1] == 0


def test_an_earlier_freeze_is_left_alone(monkeypatch):
    # Not the exact freeze count: frozen objects may be freed meanwhile (a TensorFlow
    # background thread freed 2 of ~900,000 in one run).
    calls = []
    monkeypatch.setattr(gc, "unfreeze", lambda: calls.append("unfreeze"))
    monkeypatch.setattr(gc, "freeze", lambda: calls.append("freeze"))
    monkeypatch.setattr(gc, "get_freeze_count", lambda: 1000)
    with one_collection():
        pass
    assert calls == []
