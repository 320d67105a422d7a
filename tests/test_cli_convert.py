"""`keras-gemma convert`: a transformers directory, a KerasHub preset and a GGUF file into
our format, each checked by logits against the library that made it; and out again.
"""

import os

import numpy as np
import pytest

import export_models
from keras_gemma import GemmaBackbone
from keras_gemma.cli import main


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_GEMMA_CACHE", str(tmp_path / "cache"))


def _convert(capsys, *argv):
    assert main(["convert", *argv]) == 0
    captured = capsys.readouterr()
    assert "keras-gemma: loading" in captured.err and "keras-gemma: wrote" in captured.err
    return captured.out.strip()


def test_help_shows_an_example(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "keras-gemma convert gemma3_270m ./gemma3_270m_hf --to transformers" in out
    for option in ("--to", "--dtype", "keras_gemma", "transformers", "gguf", "q8_0"):
        assert option in out


def test_dtype_that_does_not_fit_the_target(capsys, tmp_path):
    assert main(["convert", "gemma3_270m", str(tmp_path / "x.gguf"), "--dtype", "bfloat16"]) == 2
    assert "a GGUF file takes f16, bf16, q8_0" in capsys.readouterr().err
    assert main(["convert", "gemma3_270m", str(tmp_path / "x"), "--dtype", "q8_0"]) == 2
    assert "is for GGUF output" in capsys.readouterr().err


def test_unknown_source_is_a_clear_error(capsys, tmp_path):
    assert main(["convert", str(tmp_path / "missing"), str(tmp_path / "out")]) == 1
    assert "keras-gemma: error:" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")


def test_transformers_directory_to_keras_gemma(tmp_path, capsys):
    pytest.importorskip("transformers")
    model = export_models.transformers_model("gemma2")
    model.save_pretrained(tmp_path / "hf")
    path = _convert(capsys, str(tmp_path / "hf"), str(tmp_path / "ours"))
    assert os.path.exists(os.path.join(path, "config.json"))
    token_ids, padding_mask = export_models.batch()
    expected = export_models.transformers_logits(model, token_ids, padding_mask)
    actual = export_models.logits(GemmaBackbone.from_preset(path, dtype="float32"),
                                  token_ids, padding_mask)
    present = padding_mask.astype(bool)
    np.testing.assert_allclose(actual[present], expected[present], atol=1e-4, rtol=0)


def test_keras_hub_preset_to_keras_gemma(tmp_path, capsys, sentencepiece_proto):
    keras_hub = pytest.importorskip("keras_hub")
    import keras_hub_models

    arguments = {k: v for k, v in export_models.ARCHITECTURES["gemma2"].items()
                 if k != "sliding_window_pattern"}
    backbone = keras_hub.models.GemmaBackbone(**arguments)
    keras_hub_models.randomize(backbone)
    tokenizer = keras_hub.models.GemmaTokenizer(proto=sentencepiece_proto)
    preprocessor = keras_hub.models.GemmaCausalLMPreprocessor(tokenizer, sequence_length=16)
    reference = keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=preprocessor)
    reference.save_to_preset(str(tmp_path / "keras_hub"))
    path = _convert(capsys, str(tmp_path / "keras_hub"), str(tmp_path / "ours"))
    assert os.path.exists(os.path.join(path, "tokenizer.model"))
    token_ids, padding_mask = export_models.batch()
    expected = export_models.logits(reference.backbone, token_ids, padding_mask)
    actual = export_models.logits(GemmaBackbone.from_preset(path), token_ids, padding_mask)
    present = padding_mask.astype(bool)
    np.testing.assert_allclose(actual[present], expected[present], atol=1e-4, rtol=0)


def test_gguf_file_to_keras_gemma(tmp_path, capsys, sentencepiece_proto):
    pytest.importorskip("gguf")
    pytest.importorskip("transformers")
    import gguf_files

    with open(sentencepiece_proto, "rb") as file:
        proto = file.read()
    model = export_models.transformers_model("gemma3")
    source = gguf_files.write_gguf(tmp_path / "tiny.gguf", model, "gemma3", proto,
                                   {"*": "Q8_0"})
    path = _convert(capsys, source, str(tmp_path / "ours"), "--dtype", "float32")
    token_ids, padding_mask = export_models.batch()
    expected = gguf_files.reference_logits(model, "gemma3", source, token_ids, padding_mask)
    actual = export_models.logits(GemmaBackbone.from_preset(path), token_ids, padding_mask)
    present = padding_mask.astype(bool)
    np.testing.assert_allclose(actual[present], expected[present], atol=1e-4, rtol=0)


def test_keras_gemma_preset_to_transformers_and_gguf(tmp_path, capsys, sentencepiece_proto):
    pytest.importorskip("gguf")
    lm = export_models.causal_lm("gemma3", sentencepiece_proto)
    source = lm.save_to_preset(str(tmp_path / "ours"))
    token_ids, padding_mask = export_models.batch()
    expected = export_models.logits(lm.backbone, token_ids, padding_mask)
    present = padding_mask.astype(bool)
    hf = _convert(capsys, source, str(tmp_path / "hf"), "--to", "transformers")
    assert os.path.exists(os.path.join(hf, "tokenizer.model"))
    actual = export_models.logits(GemmaBackbone.from_preset(hf), token_ids, padding_mask)
    np.testing.assert_allclose(actual[present], expected[present], atol=1e-6, rtol=0)
    file = _convert(capsys, source, str(tmp_path / "tiny-q8_0.gguf"), "--dtype", "q8_0")
    actual = export_models.logits(GemmaBackbone.from_preset(file, dtype="float32"),
                                  token_ids, padding_mask)
    # Q8_0's rounding: see tests/test_gguf_export.py for this bound.
    assert np.abs(actual - expected)[present].max() <= 0.1 * np.abs(expected[present]).max()
