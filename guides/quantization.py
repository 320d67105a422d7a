# # Quantizing Gemma to int8 and int4
#
# Run it: `KERAS_BACKEND=torch python guides/quantization.py` (or jax, tensorflow).
#
# On a CPU, generating a token reads every weight once, so decode speed is bytes read per
# token: int8 weights are a quarter of float32's, int4 an eighth. This guide quantizes Gemma 3
# 270M, measures what it costs in quality (perplexity on a paragraph) and what it saves in
# memory and time, saves the quantized model, and loads a float preset straight into int8.
#
# What `quantize("int8")` means here: each weight matrix gets one int8 value per weight and
# one float scale per output channel; the activations stay in float ("weight-only"; Keras'
# own default also rounds the activations to int8, which costs the 270M several percent of
# perplexity). `quantize("int4")` stores two weights a byte with a scale and zero point per
# group of inputs, and keeps the tied embedding (the 270M's largest table) at int8.
#
# In CI this guide runs on a tiny random model (`KERAS_GEMMA_GUIDE_PRESET`); the figures in
# the comments are from the real 270M.

import os
import tempfile
import time

import keras
import numpy as np

import keras_gemma

PRESET = os.environ.get("KERAS_GEMMA_GUIDE_PRESET", "gemma3_270m")

PARAGRAPH = (
    "The lighthouse stood on a narrow spit of rock at the mouth of the bay, and for more than "
    "a century its keepers had written the weather into a ledger every evening. The entries "
    "were short: the direction of the wind, the height of the swell, whether the lamp had "
    "needed trimming, and now and then a ship that had passed too close to the reef. When the "
    "light was automated, the last keeper carried the ledgers up the hill to the village "
    "library, where they sat on a low shelf until a student from the university found them. "
    "She spent a winter copying the numbers into a spreadsheet, and by spring she could show "
    "that the storms had grown more frequent and more violent over the years the ledgers "
    "covered. The village council, which had been arguing about whether to repair the old sea "
    "wall, asked her to present the figures at a public meeting. Nobody remembers what was "
    "said that night, but the wall was rebuilt the following summer, a little higher than "
    "before."
)


def perplexity(lm, text):
    """exp of the mean next-token loss over `text`: lower is better."""
    tokenizer = lm.preprocessor.tokenizer
    ids = [tokenizer.start_token_id] + [int(i) for i in np.asarray(tokenizer(text))]
    token_ids = np.array([ids], dtype="int32")
    losses = lm.score(
        token_ids[:, :-1], np.ones_like(token_ids[:, :-1]), scoring_mode="loss",
        target_ids=token_ids[:, 1:],
    )
    return float(np.exp(np.mean(keras.ops.convert_to_numpy(losses))))


def weight_bytes(lm):
    return sum(int(np.prod(v.shape)) * np.dtype(str(v.dtype).replace("bfloat16", "float16")).itemsize
               for v in lm.backbone.weights)


def seconds_per_token(lm, prompt="The lighthouse keeper", max_length=32):
    """Decode time per new token, after a first call that compiles."""
    new_tokens = max_length - 1 - len(np.asarray(lm.preprocessor.tokenizer(prompt)))
    lm.generate(prompt, max_length=max_length, stop_token_ids=None)
    start = time.perf_counter()
    lm.generate(prompt, max_length=max_length, stop_token_ids=None)
    return (time.perf_counter() - start) / new_tokens


# ## The float32 model, for reference
lm = keras_gemma.GemmaCausalLM.from_preset(PRESET, dtype="float32")
float_perplexity = perplexity(lm, PARAGRAPH)
float_bytes = weight_bytes(lm)
float_speed = seconds_per_token(lm)
float_text = lm.generate("The lighthouse keeper", max_length=24)
print(f"float32: perplexity {float_perplexity:.3f}, weights {float_bytes / 1e6:.2f} MB, "
      f"{1 / float_speed:.1f} tokens/s")

# ## int8
#
# `quantize` works on a loaded model, in place. The real 270M: perplexity within 1% of
# float32's, a quarter of the weights' bytes.
lm.quantize("int8")
int8_perplexity = perplexity(lm, PARAGRAPH)
int8_bytes = weight_bytes(lm)
int8_speed = seconds_per_token(lm)
print(f"int8:    perplexity {int8_perplexity:.3f} ({int8_perplexity / float_perplexity - 1:+.2%}), "
      f"weights {int8_bytes / 1e6:.2f} MB, {1 / int8_speed:.1f} tokens/s")
assert abs(int8_perplexity / float_perplexity - 1) < 0.01
assert int8_bytes < 0.3 * float_bytes
print(lm.generate("The lighthouse keeper", max_length=24))

# ## Save the quantized model, load it back
#
# `save_to_preset` writes the int8 values and scales as they are; `from_preset` rebuilds the
# int8 layers directly, with no float copy and no second rounding.
directory = os.path.join(tempfile.mkdtemp(), "gemma_int8")
lm.save_to_preset(directory)
reloaded = keras_gemma.GemmaCausalLM.from_preset(directory)
assert perplexity(reloaded, PARAGRAPH) == int8_perplexity
del reloaded

# ## Quantize while loading
#
# `from_preset(..., quantize="int8")` never holds the whole model in float: each weight is
# quantized as it is read, one layer at a time. For the 2B model that is the difference
# between needing 10 GB (float32, then quantize) and ~4 GB. The result is the same model as
# loading in float and calling `quantize`. From the command line:
# `keras-gemma generate "Hello" --quantize int8`.
loaded_int8 = keras_gemma.GemmaCausalLM.from_preset(PRESET, dtype="float32", quantize="int8")
assert perplexity(loaded_int8, PARAGRAPH) == int8_perplexity
del loaded_int8

# ## int4
#
# Half the bytes of int8 again (groups of 32 weights share a scale and zero point; the tied
# embedding stays int8). Rounding to 16 levels costs quality: on the real 270M about +25-32%
# perplexity, since round-to-nearest cannot do better on weights that were already 4-6 bits in
# the GGUF file. Measure it on text like yours before you ship it. Speed on the real 270M
# (2-core CPU, batch 1): torch decodes int4 through PyTorch's packed int4 kernels, ~2.8x its
# float32; JAX, which has no 4-bit product, reads kernels dequantized to bfloat16 once per
# `generate` call, 1.6x its float32 (58.8 against 36.8 tokens/s in one run).
lm_int4 = keras_gemma.GemmaCausalLM.from_preset(PRESET, dtype="float32", quantize="int4")
int4_perplexity = perplexity(lm_int4, PARAGRAPH)
int4_bytes = weight_bytes(lm_int4)
int4_speed = seconds_per_token(lm_int4)
print(f"int4:    perplexity {int4_perplexity:.3f} ({int4_perplexity / float_perplexity - 1:+.2%}), "
      f"weights {int4_bytes / 1e6:.2f} MB, {1 / int4_speed:.1f} tokens/s")
assert int4_bytes < int8_bytes
assert int4_perplexity / float_perplexity - 1 < 0.5
del lm_int4

# ## Calibrated int4: GPTQ
#
# GPTQ rounds a weight matrix one input at a time and pushes each rounding error onto the
# inputs not yet rounded, so that the layer's outputs on calibration text move as little as
# possible. It needs text like what the model will see; here the float model writes its own,
# sampled from a few openings. keras_gemma writes the same int4 variables as above for the
# query, key, attention output and gating projections, and keeps in int8 the value and
# FFN-down projections, the tied embedding, and every projection of the first and last
# sixth of the blocks, which rounding hurts most. `activation_order=True` rounds the inputs
# that carry the most signal first. On the real 270M: about +1-3% perplexity against
# round-to-nearest's +31.6%, depending on the calibration text (figures in
# keras_gemma/gptq_quantization.py); a few hundred tokens of calibration text are too few.
OPENINGS = [
    "The committee met on Tuesday to discuss the budget for the coming year.",
    "Photosynthesis is the process by which green plants use sunlight",
    "She opened the letter with trembling hands.",
    "In 1969, two astronauts walked on the surface of the Moon",
]
lm_gptq = keras_gemma.GemmaCausalLM.from_preset(PRESET, dtype="float32")
lm_gptq.compile(sampler=keras_gemma.samplers.TopKSampler(k=50, seed=1))
calibration = lm_gptq.generate(OPENINGS, max_length=320)
lm_gptq.quantize("gptq", config=keras.quantizers.GPTQConfig(
    dataset=calibration, tokenizer=lm_gptq.preprocessor.tokenizer, group_size=32,
    sequence_length=512, activation_order=True,
))
gptq_perplexity = perplexity(lm_gptq, PARAGRAPH)
print(f"GPTQ:    perplexity {gptq_perplexity:.3f} ({gptq_perplexity / float_perplexity - 1:+.2%}), "
      f"weights {weight_bytes(lm_gptq) / 1e6:.2f} MB")
assert np.isfinite(gptq_perplexity)

# ## Fine-tuning a quantized model
#
# LoRA trains on top of int8 weights ("QLoRA"): `lm.quantize("int8")`, then
# `lm.backbone.enable_lora(rank=4)` and `fit` as in guides/lora_fine_tuning.py;
# `merge_lora()` folds the adapters back into the int8 kernels for export.
