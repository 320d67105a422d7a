"""Optimizer slots follow their variable's memory order on torch; training is unchanged."""

import keras
import numpy as np
from conftest import tiny_config, to_numpy

import keras_gemma
from keras_gemma import optimizer_slot_layout


def _trained(monkeypatch, lay_out):
    if not lay_out:
        monkeypatch.setattr(
            "keras_gemma.causal_lm.lay_out_slots_like_variables", lambda *args: None
        )
    keras.utils.set_random_seed(7)
    # Vocabulary and FFN wider than hidden: on torch with its default decode product their
    # float32 kernels are stored column-major (decode_matmul.lay_out_for_decode).
    monkeypatch.setenv("KERAS_GEMMA_TORCH_ONEDNN", "0")
    backbone = keras_gemma.GemmaBackbone(**tiny_config(vocabulary_size=160))
    model = keras_gemma.GemmaCausalLM(backbone, compile=False)
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    ids = np.random.default_rng(0).integers(1, 160, size=(2, 9)).astype("int32")
    x = {"token_ids": ids[:, :-1], "padding_mask": np.ones((2, 8), "int32")}
    for _ in range(3):
        model.train_on_batch(x, ids[:, 1:])
    monkeypatch.undo()
    return model


def test_slots_match_their_variables_and_training_is_unchanged(monkeypatch, backend):
    laid_out = _trained(monkeypatch, lay_out=True)
    plain = _trained(monkeypatch, lay_out=False)
    for ours, reference in zip(laid_out.trainable_variables, plain.trainable_variables):
        np.testing.assert_allclose(to_numpy(ours), to_numpy(reference), rtol=1e-6, atol=1e-7)
    if backend != "torch":
        return
    embedding = laid_out.backbone.token_embedding.embeddings
    assert not embedding.value.is_contiguous(), "the test needs a column-major variable"
    prefix = embedding.path.replace("/", "_") + "_"
    slots = [v for v in laid_out.optimizer.variables if v.name.startswith(prefix)]
    assert len(slots) == 2  # Adam's momentum and velocity
    for slot in slots:
        assert slot.value.stride() == embedding.value.stride()
    unmatched = [v for v in plain.optimizer.variables if v.name.startswith(prefix)]
    assert all(v.value.is_contiguous() for v in unmatched)


def test_nothing_to_do_before_the_optimizer_is_built():
    optimizer = keras.optimizers.Adam()
    optimizer_slot_layout.lay_out_slots_like_variables(optimizer, [])
    optimizer_slot_layout.lay_out_slots_like_variables(None, [])
    assert not optimizer.built
