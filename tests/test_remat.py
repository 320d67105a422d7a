"""Activation rematerialization through Keras' own `keras.RematScope`, on every backend."""

import keras
import numpy as np
import pytest
from conftest import BACKEND, tiny_config, to_numpy

import keras_gemma


def remat_scope(num_layers):
    """The documented way: rematerialize every decoder block (see the README)."""
    names = [f"decoder_block_{index}" for index in range(num_layers)]
    return keras.RematScope(mode="list_of_layers", layer_names=names)


def _lm(remat, **overrides):
    config = tiny_config(**overrides)
    keras.utils.set_random_seed(7)
    if remat:
        with remat_scope(config["num_layers"]):
            return keras_gemma.GemmaCausalLM(keras_gemma.GemmaBackbone(**config), compile=False)
    return keras_gemma.GemmaCausalLM(keras_gemma.GemmaBackbone(**config), compile=False)


def _loss_and_gradients(lm, batch):
    """The loss of `batch` and its gradients for the trainable weights, via the backend."""
    x, y, weights = batch
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def loss_of(values):
        trainable = lm.trainable_variables
        mapping = list(zip(trainable, values))
        with keras.StatelessScope(state_mapping=mapping):
            logits = lm(x, training=True)
        return loss_fn(y, logits, sample_weight=weights)

    values = [v.value for v in lm.trainable_variables]
    if BACKEND == "jax":
        import jax

        loss, grads = jax.jit(jax.value_and_grad(loss_of))(values)
    elif BACKEND == "tensorflow":
        import tensorflow as tf

        # The model's own variables, as Keras' TensorFlow trainer does (tf.recompute_grad
        # finds the variables a rematerialized call reads; tensors swapped in it cannot).
        with tf.GradientTape() as tape:
            loss = loss_fn(y, lm(x, training=True), sample_weight=weights)
        grads = tape.gradient(loss, lm.trainable_variables)
    else:
        import torch

        values = [v.detach().clone().requires_grad_(True) for v in values]
        loss = loss_of(values)
        grads = torch.autograd.grad(loss, values)
    return to_numpy(loss), [to_numpy(g) for g in grads]


@pytest.mark.parametrize("generation", ["gemma", "gemma3"])
def test_remat_gives_the_same_loss_gradients_and_tokens(generation):
    overrides = {}
    if generation == "gemma3":
        overrides = dict(use_post_attention_norm=True, use_post_ffw_norm=True,
                         use_query_key_norm=True, use_sliding_window_attention=True,
                         sliding_window_size=4, num_layers=3)
    plain, remat = _lm(False, **overrides), _lm(True, **overrides)
    assert [b._remat_mode for b in remat.backbone.transformer_layers] != [None] * len(
        remat.backbone.transformer_layers
    )
    remat.set_weights(plain.get_weights())
    plain.backbone.enable_lora(rank=2)
    remat.backbone.enable_lora(rank=2)
    rng = np.random.default_rng(0)
    for model in (plain, remat):
        for variable in model.backbone.trainable_variables:
            variable.assign(np.random.default_rng(1).normal(0, 0.3, variable.shape))
    ids = rng.integers(4, 96, size=(2, 9)).astype("int32")
    mask = np.ones((2, 8), "int32")
    mask[1, -3:] = 0
    batch = ({"token_ids": ids[:, :-1], "padding_mask": mask}, ids[:, 1:], mask)
    loss, grads = _loss_and_gradients(plain, batch)
    remat_loss, remat_grads = _loss_and_gradients(remat, batch)
    np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
    assert len(grads) == len(remat_grads) == 2 * 2 * len(plain.backbone.transformer_layers)
    for g, r in zip(grads, remat_grads):
        np.testing.assert_allclose(r, g, rtol=1e-5, atol=1e-6)
    if generation == "gemma":  # Keras' own training step runs the rematerialized blocks
        remat.compile(optimizer=keras.optimizers.SGD(0.0),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        remat.fit(batch[0], batch[1], batch_size=2, epochs=1, verbose=0)
        return
    # Generation (cached calls: never rematerialized) gives the same ids.
    prompt = {"token_ids": ids[:, :8], "padding_mask": np.arange(8)[None].repeat(2, 0) < 4}
    expected = plain.generate(prompt, max_length=8, stop_token_ids=None)
    actual = remat.generate(prompt, max_length=8, stop_token_ids=None)
    np.testing.assert_array_equal(to_numpy(actual["token_ids"]), to_numpy(expected["token_ids"]))


def test_remat_keeps_fewer_activations_for_the_backward_pass():
    if BACKEND != "jax":
        pytest.skip("XLA's memory analysis of the training step is JAX's")
    import jax

    def temporaries(remat):
        lm = _lm(remat, num_layers=4, hidden_dim=64, intermediate_dim=512)
        lm.backbone.enable_lora(rank=2)
        ids = np.ones((4, 256), "int32")
        x = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
        trainable = lm.trainable_variables
        frozen = lm.non_trainable_variables

        def loss(values, frozen_values):
            mapping = list(zip(trainable, values)) + list(zip(frozen, frozen_values))
            with keras.StatelessScope(state_mapping=mapping):
                return keras.ops.mean(lm(x, training=True))

        step = jax.jit(jax.grad(loss))
        args = ([v.value for v in trainable], [v.value for v in frozen])
        return step.lower(*args).compile().memory_analysis().temp_size_in_bytes

    plain, remat = temporaries(False), temporaries(True)
    print(f"XLA temporaries of a LoRA step, 4 x 256 tokens: {plain / 1e6:.1f} MB, "
          f"with RematScope {remat / 1e6:.1f} MB")
    assert remat < 0.7 * plain
