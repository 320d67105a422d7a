"""The loader: one handle, every part of a preset (backbone, tokenizer, metadata)."""

import os
import shutil

import keras
import numpy as np

from keras_gemma import GemmaBackbone, GemmaTokenizer
from keras_gemma.checkpoints import loader
from tokenizer_corpus import CORPUS


def _transformers_directory(sentencepiece_proto, tmp_path):
    """A directory written by transformers' save_pretrained: model and tokenizer."""
    import torch
    import transformers

    source = tmp_path / "source"
    source.mkdir()
    shutil.copy(sentencepiece_proto, source / "tokenizer.model")
    tokenizer = transformers.GemmaTokenizer.from_pretrained(str(source))
    config = transformers.Gemma3TextConfig(
        vocab_size=1000, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=4,
    )
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(config)
    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    tokenizer.save_pretrained(saved)
    return str(saved)


def test_transformers_directory_with_its_tokenizer_loads(sentencepiece_proto, tmp_path):
    directory = _transformers_directory(sentencepiece_proto, tmp_path)
    # transformers 5 writes tokenizer.json only; the SentencePiece model is rebuilt from it.
    assert not os.path.exists(os.path.join(directory, "tokenizer.model"))
    rebuilt = GemmaTokenizer.from_preset(directory)
    original = GemmaTokenizer(proto=sentencepiece_proto)
    assert rebuilt(CORPUS) == original(CORPUS)
    backbone = GemmaBackbone.from_preset(directory)
    assert backbone.vocabulary_size == 1000 and backbone.use_query_key_norm


def test_resolve_detects_each_format(tmp_path, sentencepiece_proto):
    backbone = GemmaBackbone(
        vocabulary_size=50, num_layers=1, num_query_heads=2, num_key_value_heads=1,
        hidden_dim=8, intermediate_dim=16, head_dim=4,
    )
    backbone.save_to_preset(tmp_path / "ours")
    assert loader.resolve(str(tmp_path / "ours")).kind == "keras_gemma"
    directory = _transformers_directory(sentencepiece_proto, tmp_path)
    assert loader.resolve(directory).kind == "transformers"
    metadata = loader.preset_metadata(str(tmp_path / "ours"))
    assert metadata["instruction_tuned"] is False
    loaded = GemmaBackbone.from_preset(str(tmp_path / "ours"))
    assert np.array_equal(
        keras.ops.convert_to_numpy(loaded.token_embedding.embeddings),
        keras.ops.convert_to_numpy(backbone.token_embedding.embeddings),
    )
