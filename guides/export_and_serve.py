# # Export and serve: a TF SavedModel that generates
#
# Run it: `KERAS_BACKEND=jax python guides/export_and_serve.py` (or tensorflow, torch).
#
# `export_saved_model` writes a TensorFlow SavedModel that holds the whole text-in,
# text-out path: the SentencePiece tokenizer, the prefill, the decode loop with its KV
# cache, and the detokenizer. TF Serving (or any TensorFlow program) can then answer
# `{"prompts": [...]}` with text, with no Python code of ours. A model on JAX or PyTorch is
# exported too: it is saved as a preset and rebuilt under TensorFlow in a subprocess.
#
# Runs offline on Gemma 3 270M; in CI `KERAS_GEMMA_GUIDE_PRESET` names a tiny model.

import json
import os
import subprocess
import sys
import tempfile

import keras_gemma

PRESET = os.environ.get("KERAS_GEMMA_GUIDE_PRESET", "gemma3_270m")
lm = keras_gemma.GemmaCausalLM.from_preset(PRESET, dtype="float32")

# ## Export
#
# TF Serving expects `<model_base_path>/<version>/`. `max_length` is the longest output
# (prompt included) a request may ask for; it sizes the KV cache. The sampler is baked in:
# "greedy" here, so the served text equals `generate`'s.
base = tempfile.mkdtemp(prefix="served_gemma_")
path = os.path.join(base, "gemma", "1")
keras_gemma.export_saved_model(lm, path, max_length=32, sampler="greedy")
print(sorted(os.listdir(path)))
assert os.path.exists(os.path.join(path, "saved_model.pb"))
assert os.path.exists(os.path.join(path, "assets", "tokenizer.model"))

# ## Call it from TensorFlow
#
# The serving side needs only TensorFlow and tensorflow-text (whose SentencePiece ops the
# SavedModel uses). This is the code a TensorFlow program would run; here it runs in its own
# process, as a server would, whatever backend this guide runs on.
SERVING_CODE = """
import json, sys
import tensorflow as tf
import tensorflow_text  # registers the SentencePiece ops the SavedModel calls

served = tf.saved_model.load(sys.argv[1])
print("signatures:", sorted(served.signatures))
prompts = tf.constant(json.loads(sys.argv[2]))
text = served.signatures["generate"](prompts=prompts)["text"]
short = served.signatures["generate_with_length"](prompts=prompts, max_length=tf.constant(12))["text"]
logits = served.signatures["logits"](
    token_ids=tf.constant([[2, 10, 11]]), padding_mask=tf.constant([[1, 1, 1]]))["logits"]
print("RESULT " + json.dumps({
    "text": [t.decode() for t in text.numpy()],
    "short": [t.decode() for t in short.numpy()],
    "logits_shape": logits.shape.as_list(),
}))
"""
prompts = ["The capital of France is", "Keras is"]
result = subprocess.run(
    [sys.executable, "-c", SERVING_CODE, path, json.dumps(prompts)],
    capture_output=True, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
)
lines = [line for line in result.stdout.splitlines() if line.startswith(("signatures:", "RESULT "))]
print("\n".join(lines))
assert lines and lines[-1].startswith("RESULT "), result.stderr[-2000:]
served = json.loads(lines[-1][len("RESULT "):])

# The served text is what `generate` gives here (same weights, same greedy loop).
assert served["text"] == lm.generate(prompts, max_length=32), served["text"]
assert served["short"] == lm.generate(prompts, max_length=12), served["short"]
assert served["logits_shape"] == [1, 3, lm.preprocessor.tokenizer.vocabulary_size()]

# ## Serve it with TF Serving
#
# Point TF Serving at the base path (a build that includes tensorflow-text's ops), then POST
# prompts to the "generate" signature:
#
#     tensorflow_model_server --rest_api_port=8501 --model_name=gemma \
#         --model_base_path=/path/to/served_gemma/gemma
#     curl -s localhost:8501/v1/models/gemma:predict \
#       -d '{"signature_name": "generate", "instances": [{"prompts": "The capital of France is"}]}'
#
# The answer is `{"predictions": ["The capital of France is ..."]}`. The command line does
# the export in one step: `keras-gemma export gemma3_270m ./served/gemma/1 --max-length 128`.
print("exported to", path)
