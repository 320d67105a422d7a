"""TF SavedModel export: generate and logits served from a fresh process without keras_gemma."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_gemma
from keras_gemma import GemmaBackbone, GemmaCausalLM, GemmaCausalLMPreprocessor, GemmaTokenizer

PROMPTS = ["The quick brown fox", "", "hello world and more words here, in a long prompt"]
MAX_LENGTH = 24
LONG_PROMPT = " ".join(["word"] * 200)  # far more than MAX_LENGTH tokens
THREAD_ROUNDS = 12  # calls per serving thread after the warm-up (8 threads)


@pytest.fixture(scope="module")
def causal_lm(sentencepiece_proto):
    tokenizer = GemmaTokenizer(proto=sentencepiece_proto)
    preprocessor = GemmaCausalLMPreprocessor(tokenizer, sequence_length=MAX_LENGTH)
    keras.utils.set_random_seed(3)
    backbone = GemmaBackbone(
        vocabulary_size=tokenizer.vocabulary_size(), num_layers=2, num_query_heads=2,
        num_key_value_heads=1, hidden_dim=32, intermediate_dim=64, head_dim=16,
        use_sliding_window_attention=True, sliding_window_size=6, use_query_key_norm=True,
        use_post_attention_norm=True, use_post_ffw_norm=True,
    )
    return GemmaCausalLM(backbone, preprocessor)


@pytest.fixture(scope="module")
def exported(causal_lm, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("served") / "gemma" / "1")
    keras_gemma.export_saved_model(causal_lm, path, max_length=MAX_LENGTH)
    return path


SERVE = r"""
import json, sys
import numpy as np
import tensorflow as tf
import tensorflow_text  # registers the SentencePiece ops
path, request = sys.argv[1], json.loads(sys.argv[2])
model = tf.saved_model.load(path)
out = {}
generate = model.signatures["generate"]
out["text"] = [t.decode("utf-8") for t in generate(prompts=tf.constant(request["prompts"], tf.string))["text"].numpy()]
out["empty"] = generate(prompts=tf.constant([], tf.string))["text"].numpy().tolist()
short = model.signatures["generate_with_length"](
    prompts=tf.constant(request["prompts"][:1]), max_length=tf.constant(8))
out["short"] = [t.decode("utf-8") for t in short["text"].numpy()]
out["long"] = [t.decode("utf-8") for t in generate(prompts=tf.constant([request["long"]]))["text"].numpy()]
logits = model.signatures["logits"](
    token_ids=tf.constant(request["token_ids"], tf.int32),
    padding_mask=tf.constant(request["padding_mask"], tf.int32))["logits"].numpy()
np.save(request["logits_file"], logits)
out["modules"] = sorted(m for m in sys.modules if m.startswith("keras_gemma"))
# 8 threads calling generate_with_length at once (as TF Serving's threads do): each call must
# return what the same call returned alone, and memory must stay flat over many calls.
import resource, threading
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
with_length = model.signatures["generate_with_length"]
cases = request["thread_cases"]
def call(case):
    prompts, length = case
    texts = with_length(prompts=tf.constant(prompts), max_length=tf.constant(length))["text"]
    return [t.decode("utf-8") for t in texts.numpy()]
alone = [call(case) for case in cases]
errors, mismatches, calls = [], [], []
def worker(thread, rounds):
    for r in range(rounds):
        index = (thread + r) % len(cases)
        try:
            if call(cases[index]) != alone[index]:
                mismatches.append(index)
        except Exception as error:
            errors.append(repr(error))
        calls.append(index)
def in_threads(rounds):
    threads = [threading.Thread(target=worker, args=(t, rounds)) for t in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
in_threads(1)  # warm-up: the allocator's pools and the functions' first calls
before = rss()
in_threads(request["thread_rounds"])
out["threads"] = {"calls": len(calls), "errors": errors, "mismatches": mismatches,
                  "rss_before": before, "rss_after": rss()}
print("RESULT " + json.dumps(out))
"""


def _serve(path, tmp_path):
    token_ids = np.array([[2, 50, 60, 70, 0], [2, 80, 90, 0, 0]], dtype="int32")
    padding_mask = (token_ids != 0).astype("int32")
    request = {
        "prompts": PROMPTS,
        "token_ids": token_ids.tolist(),
        "padding_mask": padding_mask.tolist(),
        "logits_file": str(tmp_path / "logits.npy"),
        "long": LONG_PROMPT,
        # Mixed prompts, batch sizes and max_lengths for the 8 serving threads (batches of 1
        # and 3, the sizes the requests above ran already: no new XLA compile).
        "thread_cases": [[[PROMPTS[0]], 20], [PROMPTS, 12], [[PROMPTS[2]], 24],
                         [PROMPTS[::-1], 16], [["one more"], 9], [[PROMPTS[1]], 24]],
        "thread_rounds": THREAD_ROUNDS,
    }
    environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    environment.pop("KERAS_BACKEND", None)
    result = subprocess.run(
        [sys.executable, "-c", SERVE, path, json.dumps(request)],
        capture_output=True, text=True, env=environment, timeout=300,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, result.stderr[-3000:]
    return json.loads(lines[0][len("RESULT "):]), np.load(tmp_path / "logits.npy"), request


def test_served_generate_and_logits_match_the_keras_model(causal_lm, exported, tmp_path):
    served, logits, request = _serve(exported, tmp_path)
    assert served["modules"] == []  # the server never imported keras_gemma
    assert served["text"] == causal_lm.generate(PROMPTS, max_length=MAX_LENGTH)
    assert served["empty"] == []
    assert served["short"] == [causal_lm.generate(PROMPTS[0], max_length=8)]
    # A prompt longer than max_length is truncated as generate() truncates it, not an error.
    assert served["long"] == [causal_lm.generate(LONG_PROMPT, max_length=MAX_LENGTH)]
    inputs = {
        "token_ids": np.array(request["token_ids"], "int32"),
        "padding_mask": np.array(request["padding_mask"], "int32"),
    }
    expected = keras.ops.convert_to_numpy(causal_lm(inputs))
    np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=0)
    threads = served["threads"]
    growth = threads["rss_after"] - threads["rss_before"]
    print(f"\nSavedModel generate from 8 threads: {threads['calls']} calls, "
          f"{len(threads['errors'])} errors, {len(threads['mismatches'])} differing from serial; "
          f"RSS {threads['rss_before'] / 1e6:.0f} MB -> {threads['rss_after'] / 1e6:.0f} MB")
    assert threads["errors"] == [] and threads["mismatches"] == []
    assert threads["calls"] == 8 * (1 + THREAD_ROUNDS)
    assert growth < 20e6, f"memory grew by {growth / 1e6:.0f} MB over {threads['calls']} calls"


def test_saved_model_cli_lists_the_signatures(exported):
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    if not os.path.exists(cli):
        pytest.skip("saved_model_cli is not installed beside this Python")
    result = subprocess.run(
        [cli, "show", "--dir", exported, "--all"], capture_output=True, text=True, timeout=300
    )
    text = result.stdout
    for name in ("serving_default", "generate", "logits"):
        assert f"signature_def['{name}']" in text, text[-3000:]
    assert "dtype: DT_STRING" in text and "shape: (-1)" in text
    assert "dtype: DT_INT32" in text and "shape: (-1, -1)" in text
    assert "dtype: DT_FLOAT" in text and "shape: (-1, -1, " in text
    assert os.path.exists(os.path.join(exported, "assets", "tokenizer.model"))


def test_export_needs_a_preprocessor(causal_lm, tmp_path):
    bare = GemmaCausalLM(causal_lm.backbone)
    with pytest.raises(ValueError, match="preprocessor"):
        keras_gemma.export_saved_model(bare, str(tmp_path / "x"))


def test_contrastive_search_is_refused_before_anything_is_written(causal_lm, tmp_path):
    with pytest.raises(ValueError, match="contrastive search.*another sampler"):
        keras_gemma.export_saved_model(causal_lm, str(tmp_path / "x"), sampler="contrastive")
    assert os.listdir(tmp_path) == []
