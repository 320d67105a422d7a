"""torch's fused attention for many query positions: numpy's attention, the einsum path's."""

import keras
import numpy as np
import pytest
from conftest import BACKEND, to_numpy

from keras_gemma.layers import attention as attention_module
from keras_gemma.layers import torch_attention
from keras_gemma.layers.attention import GemmaAttention, compute_attention_mask


def _numpy_attention(query, key, value, mask, scale):
    """query [b, q, k, g, h], key/value [b, s, k, h], mask [b or 1, q, s] bool."""
    logits = np.einsum("bqkgh,bskh->bkgqs", query.astype("float64"), key.astype("float64"))
    logits = np.where(mask[:, None, None], logits * scale, -1e30)
    logits -= logits.max(-1, keepdims=True)
    probabilities = np.exp(logits)
    probabilities /= probabilities.sum(-1, keepdims=True)
    return np.einsum("bkgqs,bskh->bqkgh", probabilities, value.astype("float64"))


def _inputs(batch=2, length=6, kv_heads=2, groups=3, head_dim=8, seed=0):
    rng = np.random.default_rng(seed)
    query = rng.normal(size=(batch, length, kv_heads, groups, head_dim)).astype("float32")
    key, value = (rng.normal(size=(batch, length, kv_heads, head_dim)).astype("float32")
                  for _ in range(2))
    return query, key, value


def test_applies_only_on_torch_to_several_positions_without_soft_cap_or_dropout():
    query, _, _ = _inputs()
    query = keras.ops.convert_to_tensor(query)
    mask = compute_attention_mask(6, 6)
    assert torch_attention.applies(query, mask, None, False) == (BACKEND == "torch")
    assert not torch_attention.applies(query, mask, 50.0, False)  # Gemma 2's soft-cap
    assert not torch_attention.applies(query, mask, None, True)  # dropout while training
    assert not torch_attention.applies(query[:, :1], mask[:, :1], None, False)  # a decode step


def test_fused_attention_equals_numpy_with_windows_padding_and_masked_rows():
    if BACKEND != "torch":
        pytest.skip("torch's scaled_dot_product_attention")
    import torch

    query, key, value = _inputs()
    padding = np.array([[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]], "int32")
    mask = to_numpy(compute_attention_mask(6, 6, padding_mask=padding, sliding_window_size=3))
    mask[1, 0] = False  # a query that sees no key: uniform over all of them, as the einsums
    shaped = keras.ops.expand_dims(keras.ops.convert_to_tensor(mask), (1, 2))
    for given in (keras.ops.convert_to_tensor(mask), shaped):
        additive = torch_attention.additive_mask(given, torch.float32, -1e30)
        output = torch_attention.attend(
            *(keras.ops.convert_to_tensor(x) for x in (query, key, value)), additive, 0.3)
        expected = _numpy_attention(query, key, value, mask, 0.3)
        np.testing.assert_allclose(to_numpy(output), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(expected[1, 0], value[1].mean(0)[:, None].repeat(3, 1), atol=1e-6)


@pytest.mark.parametrize("soft_cap", [None, 50.0])
def test_layer_with_a_cache_equals_its_einsum_path(monkeypatch, soft_cap):
    """The layer's prefill into a cache and a later step, fused or not, in float32."""
    layer = GemmaAttention(
        4, 2, 8, query_pre_attn_scalar=8, attention_logit_soft_cap=soft_cap,
        use_query_key_norm=True, dtype="float32",
    )
    rng = np.random.default_rng(1)
    x = keras.ops.convert_to_tensor(rng.normal(size=(2, 5, 16)).astype("float32"))
    layer.build((None, None, 16))
    mask = compute_attention_mask(5, 7, padding_mask=np.array([[0, 1, 1, 1, 1, 1, 1]] * 2))

    def run():
        cache = keras.ops.zeros((2, 2, 7, 2, 8))
        output, cache = layer(x, attention_mask=mask, cache=cache, cache_update_index=0)
        return to_numpy(output), to_numpy(cache)

    fused = run()
    monkeypatch.setattr(attention_module.torch_attention, "applies", lambda *a, **k: False)
    plain = run()
    for a, b in zip(fused, plain):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_a_cached_call_derives_each_mask_once_for_all_blocks(monkeypatch):
    """CachePositions.derived makes a thing once per source tensor; the fused path converts
    the call's boolean mask once for every block (torch; elsewhere nothing converts)."""
    from keras_gemma import GemmaBackbone, GemmaCausalLM
    from keras_gemma.layers.attention import CachePositions

    positions = CachePositions(3, 5)
    mask = positions.attention_mask()
    made = []
    for source in (mask, mask, positions.attention_mask(sliding_window_size=2)):
        positions.derived(source, "kind", lambda m: made.append(m) or len(made))
    assert len(made) == 2 and made[0] is mask

    conversions = []
    additive_mask = torch_attention.additive_mask
    monkeypatch.setattr(torch_attention, "additive_mask",
                        lambda *a: conversions.append(1) or additive_mask(*a))
    from conftest import tiny_config

    lm = GemmaCausalLM(GemmaBackbone(**tiny_config(num_layers=3)))
    caches = [keras.ops.zeros((1, 2, 8, 2, 8)) for _ in range(3)]
    lm.hidden_with_cache(keras.ops.ones((1, 6), "int32"), caches, 0)
    assert len(conversions) == (1 if BACKEND == "torch" else 0)
