"""The measured choice of torch's training products: settings force it, measurements decide."""

import pytest
from conftest import BACKEND

from keras_gemma.layers import torch_product_choice as choice

pytestmark = pytest.mark.skipif(BACKEND != "torch", reason="torch's products")


def test_settings_force_the_choice(monkeypatch):
    monkeypatch.setenv("KERAS_GEMMA_TORCH_ONEDNN", "0")
    monkeypatch.setenv("KERAS_GEMMA_TORCH_NATIVE_16BIT", "0")
    assert choice.onednn_float32_is_faster() is False
    assert choice.native_sixteen_bit_is_fast("bfloat16") is False
    monkeypatch.setenv("KERAS_GEMMA_TORCH_ONEDNN", "1")
    monkeypatch.setenv("KERAS_GEMMA_TORCH_NATIVE_16BIT", "1")
    assert choice.onednn_float32_is_faster() is choice.onednn_available()
    assert choice.native_sixteen_bit_is_fast("float16") is True


def test_measurements_answer_once_per_process(monkeypatch):
    monkeypatch.delenv("KERAS_GEMMA_TORCH_ONEDNN", raising=False)
    monkeypatch.delenv("KERAS_GEMMA_TORCH_NATIVE_16BIT", raising=False)
    calls = []
    monkeypatch.setattr(choice, "_best_seconds", lambda product: calls.append(1) or 1.0)
    choice._onednn_measured.cache_clear()
    choice._native_measured.cache_clear()
    try:
        # Equal times: neither form is 1.2x faster, so the default stays.
        assert choice.onednn_float32_is_faster() is False
        assert choice.native_sixteen_bit_is_fast("bfloat16") is False
        choice.onednn_float32_is_faster()
        choice.native_sixteen_bit_is_fast("bfloat16")
        assert len(calls) == (4 if choice.onednn_available() else 2)
    finally:
        choice._onednn_measured.cache_clear()
        choice._native_measured.cache_clear()
