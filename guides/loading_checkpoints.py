# # Loading checkpoints: presets, KerasHub, transformers, GGUF and hub handles
#
# Run it: `KERAS_BACKEND=jax python guides/loading_checkpoints.py` (or tensorflow, torch).
#
# `from_preset` takes one handle and finds out what is behind it: a preset name, a
# keras_gemma or KerasHub preset directory, a transformers directory, a GGUF file, or a
# `kaggle://` / `hf://` handle that is downloaded first. This guide writes the model it
# loads in each local format and reads it back, checking that the logits survive the trip:
# that is also how weights leave keras_gemma for transformers, vLLM or llama.cpp.
#
# Runs offline on Gemma 3 270M; in CI `KERAS_GEMMA_GUIDE_PRESET` names a tiny model.

import os
import tempfile

import keras
import numpy as np

import keras_gemma

PRESET = os.environ.get("KERAS_GEMMA_GUIDE_PRESET", "gemma3_270m")
lm = keras_gemma.GemmaCausalLM.from_preset(PRESET, dtype="float32")
work = tempfile.mkdtemp(prefix="gemma_checkpoints_")

batch = lm.preprocessor.generate_preprocess(["The quick brown fox jumps over the lazy dog"])


def logits(model):
    """float32 logits of the same tokens, as numpy, whatever the backend."""
    return keras.ops.convert_to_numpy(model.score(batch["token_ids"], batch["padding_mask"]))


reference = logits(lm)

# ## Preset names
#
# `keras_gemma.list_presets()` names every preset; each has a card saying its architecture
# and where its weights live (`keras-gemma presets` prints them as a table, with which ones
# this machine has offline). A name that is almost right gets suggestions.
print(len(keras_gemma.list_presets()), "presets, e.g.", keras_gemma.list_presets()[:3])
try:
    keras_gemma.GemmaCausalLM.from_preset("gemma_2b")
except ValueError as error:
    print("typo:", error)
    assert "gemma_2b_en" in str(error)

# ## A keras_gemma preset directory
#
# `save_to_preset` writes config.json, model.safetensors and tokenizer.model; reading it
# back gives the same model. The write is atomic: an interrupted save leaves the old
# directory or nothing.
ours = os.path.join(work, "keras_gemma_preset")
lm.save_to_preset(ours)
print(sorted(os.listdir(ours)))
np.testing.assert_allclose(logits(keras_gemma.GemmaCausalLM.from_preset(ours)), reference,
                           rtol=1e-5, atol=1e-5)

# ## A transformers directory
#
# `export_to_transformers` writes what `transformers.AutoModelForCausalLM.from_pretrained`
# and `AutoTokenizer.from_pretrained` read (config.json, model.safetensors, tokenizer
# files) with no code of ours; vLLM and most serving stacks read the same layout. A
# directory downloaded from Hugging Face loads the same way: pass its path.
hf_directory = os.path.join(work, "transformers")
lm.export_to_transformers(hf_directory)
print(sorted(os.listdir(hf_directory)))
from_hf = keras_gemma.GemmaCausalLM.from_preset(hf_directory)
np.testing.assert_allclose(logits(from_hf), reference, rtol=1e-5, atol=1e-5)

# ## A GGUF file
#
# llama.cpp's format. `export_to_gguf` writes one file with the vocabulary inside, as f16,
# bf16 or q8_0 (8-bit blocks). `from_preset` reads any Gemma GGUF (quantized types are
# dequantized once and cached), so the logits match within the format's precision.
gguf_file = os.path.join(work, "gemma-f16.gguf")
lm.export_to_gguf(gguf_file, dtype="f16")
print("GGUF:", os.path.getsize(gguf_file) // 1024, "KiB")
from_gguf = keras_gemma.GemmaCausalLM.from_preset(gguf_file)
difference = np.max(np.abs(logits(from_gguf) - reference))
print("largest logit difference after f16:", difference)
assert difference < 0.05 * max(1.0, np.max(np.abs(reference)))

# ## A KerasHub preset
#
# Presets written by KerasHub (`keras_hub.models.GemmaCausalLM.save_to_preset`, or the ones
# on Kaggle under keras/gemma) load directly. Here a small KerasHub model is made and saved,
# when keras_hub is installed, and keras_gemma's logits are compared with KerasHub's own.
try:
    import keras_hub
except ImportError:
    keras_hub = None
if keras_hub is not None:
    hub_backbone = keras_hub.models.GemmaBackbone(
        vocabulary_size=lm.backbone.vocabulary_size, num_layers=2, num_query_heads=2,
        num_key_value_heads=1, hidden_dim=32, intermediate_dim=64, head_dim=16,
    )
    hub_tokenizer = keras_hub.models.GemmaTokenizer(proto=lm.preprocessor.tokenizer.proto)
    hub_lm = keras_hub.models.GemmaCausalLM(
        backbone=hub_backbone,
        preprocessor=keras_hub.models.GemmaCausalLMPreprocessor(hub_tokenizer),
    )
    hub_directory = os.path.join(work, "keras_hub_preset")
    hub_lm.save_to_preset(hub_directory)
    from_hub = keras_gemma.GemmaCausalLM.from_preset(hub_directory)
    hub_logits = keras.ops.convert_to_numpy(hub_lm.score(batch["token_ids"], batch["padding_mask"]))
    np.testing.assert_allclose(logits(from_hub), hub_logits, rtol=1e-4, atol=1e-4)
    print("KerasHub preset: same logits as KerasHub")

# ## Kaggle and Hugging Face handles
#
# Remote handles download through kagglehub and huggingface_hub into their caches, then
# load like the directories above:
#
#     keras_gemma.GemmaCausalLM.from_preset("kaggle://keras/gemma/keras/gemma_2b_en/3")
#     keras_gemma.GemmaCausalLM.from_preset("hf://google/gemma-2-2b")
#
# Gemma is gated: accept the license on Kaggle or Hugging Face, then set KAGGLE_USERNAME and
# KAGGLE_KEY, or HF_TOKEN. Offline or without credentials, the error says so at once and
# names both ways out (credentials, or a local directory). A handle that cannot be right is
# refused before any download:
try:
    keras_gemma.GemmaCausalLM.from_preset("kaggle://keras/gemma")
except ValueError as error:
    print("bad handle:", error)
    assert "kaggle://owner/model/framework/variation" in str(error)

# Loading never runs code from a checkpoint: pickled PyTorch `.bin` weights are refused, and
# a config naming a class outside keras_gemma's Gemma classes is refused without importing it.
print("all formats read back:", work)
