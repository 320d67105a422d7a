# # Fine-tuning Gemma on several devices
#
# Run it: `KERAS_BACKEND=jax python guides/distributed_fine_tuning.py`
#
# A model that does not fit on one accelerator, or a batch that would take too long on one,
# is split over a mesh of devices with Keras' own `keras.distribution`: a `DeviceMesh` names
# the axes of a grid of devices, a `LayoutMap` says which axis of each weight is split over
# which mesh axis, and `ModelParallel` applies both to every variable Keras creates and to
# every batch it feeds. keras_gemma only supplies the layout map for Gemma's weights.
#
# In Keras 3.15.1 `keras.distribution` exists for the JAX backend only; TensorFlow and
# PyTorch have no distribution library there.
#
# Without 8 accelerators, the guide makes XLA pretend that the CPU is 8 devices (the flag
# must be set before JAX starts, hence at the top). It runs offline: it trains a small
# tokenizer, writes a tiny random Gemma preset into a temporary directory and loads that.
# The same steps with `from_preset("gemma_7b_en")` are the real thing on a TPU v3-8 or a
# machine with 8 GPUs; the memory that needs is computed below.

import os

os.environ.setdefault("KERAS_BACKEND", "jax")
# Only the host (CPU) platform is affected: on GPUs or TPUs JAX still uses those.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import io  # noqa: E402
import tempfile  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import sentencepiece  # noqa: E402

import keras_gemma  # noqa: E402
from keras_gemma.distribution import check_layout, variable_shapes  # noqa: E402

devices = keras.distribution.list_devices()
print(f"{len(devices)} devices: {devices[0]} ...")
assert len(devices) >= 8, "this guide needs 8 devices (or the XLA flag above, set before JAX)"

# ## The mesh and the layout map
#
# A (2, 4) mesh: 2 replicas along "batch", each one model split over 4 devices along
# "model". Every batch is cut in 2 along "batch"; every large weight is cut in 4 along
# "model" and held twice, once per replica.
#
# `get_layout_map` splits the vocabulary of the embedding, the head_dim axis of the
# attention kernels and the width of the feed-forward kernels over "model", and keeps the
# norms whole. It splits head_dim rather than the heads because gemma_2b_en has one
# key/value head and Gemma 3 1B four query heads: heads cannot be split 8 ways, head_dim
# (128 or 256) can (keras_gemma/distribution.py gives the measurements).
mesh = keras.distribution.DeviceMesh((2, 4), ("batch", "model"), devices[:8])
layout_map = keras_gemma.GemmaBackbone.get_layout_map(mesh)
print(layout_map["decoder_block_0/attention/query/kernel"].axes)

# ## What gemma_7b_en needs per device
#
# The numbers come from the layout map and the architecture's shapes
# (`variable_shapes(config)`), not from allocating anything. On a TPU v3-8 (8 cores of
# 16 GB) or 8 GPUs, use a (1, 8) mesh: all 8 devices split one copy of the weights.
# `check_layout` fails with the variable's name if the mesh does not divide a dimension it
# splits, and otherwise returns the parameters one device holds.
config_7b = keras_gemma.GemmaBackbone.presets["gemma_7b_en"]["backbone"]
mesh_1x8 = keras.distribution.DeviceMesh((1, 8), ("batch", "model"), devices[:8])
layout_1x8 = keras_gemma.GemmaBackbone.get_layout_map(mesh_1x8)
total = sum(int(np.prod(shape)) for _, shape in variable_shapes(config_7b))
per_device = check_layout("gemma_7b_en", layout_1x8)
lora = sum(int(np.prod(s)) for p, s in variable_shapes(config_7b, lora_rank=4) if "lora" in p)
gib = 2**30
print(f"gemma_7b_en: {total / 1e9:.2f} B parameters, {2 * total / gib:.1f} GiB in bfloat16; "
      f"on a (1, 8) mesh {2 * per_device / gib:.2f} GiB of weights per device; LoRA rank 4 "
      f"adds {lora / 1e6:.1f} M trainable parameters (with Adam's two moments in float32, "
      f"{12 * lora / gib:.2f} GiB before they are split)")
assert per_device < total / 8 * 1.01
# The rest of a device's memory goes to activations: with batch 2 x 128 tokens they are
# small next to the weights printed above, so a TPU v3 core's 16 GB leaves room for longer
# sequences or a larger batch. What a user of the TPU v3-8 would write:
#
#     keras.distribution.set_distribution(keras.distribution.ModelParallel(
#         layout_map=layout_1x8, batch_dim_name="batch"))
#     lm = keras_gemma.GemmaCausalLM.from_preset("gemma_7b_en", dtype="bfloat16")
#     lm.backbone.enable_lora(rank=4)
#     lm.preprocessor.sequence_length = 128
#     lm.fit(texts, batch_size=2, epochs=1)

# ## A tiny preset to load (offline)
#
# A stand-in for a downloaded preset: a SentencePiece tokenizer with Gemma's special ids
# (pad 0, eos 1, bos 2, unk 3), trained on the text we fine-tune on, and a random two-layer
# Gemma saved with `save_to_preset`. It is built on one device, before any distribution is
# set; the preset on disk does not record how it was laid out.
texts = [
    "Keras runs the same model on JAX, TensorFlow and PyTorch.",
    "A device mesh names the axes of a grid of accelerators.",
    "The layout map says which axis of each weight is split.",
    "LoRA trains two small matrices beside each frozen kernel.",
    "Gemma shares its embedding between the input and the output.",
    "Each replica reads its own slice of every batch.",
    "Sharded weights are gathered by the compiler, not by hand.",
    "A small model learns these sentences in a few steps.",
]
buffer = io.BytesIO()
sentencepiece.SentencePieceTrainer.train(
    sentence_iterator=iter(texts * 4), model_writer=buffer, model_type="BPE", vocab_size=384,
    byte_fallback=True, pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>",
    eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>", minloglevel=2, num_threads=1,
)
tokenizer = keras_gemma.GemmaTokenizer(proto=buffer.getvalue())
tiny = dict(vocabulary_size=384, num_layers=2, num_query_heads=4, num_key_value_heads=1,
            hidden_dim=64, intermediate_dim=128, head_dim=16)
keras.utils.set_random_seed(0)
preset_dir = os.path.join(tempfile.mkdtemp(), "tiny_gemma")
keras_gemma.GemmaCausalLM(
    keras_gemma.GemmaBackbone(**tiny),
    keras_gemma.GemmaCausalLMPreprocessor(tokenizer, sequence_length=32),
).save_to_preset(preset_dir)

# ## Loading under the distribution
#
# Check the layout against the architecture first, then set the distribution: from here on
# every variable is created split as the map says, and `from_preset` places each weight
# shard by shard as it reads it (a whole 7B checkpoint is never held in host memory beside
# its shards).
check_layout(tiny, layout_map)
keras.distribution.set_distribution(
    keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch")
)
lm = keras_gemma.GemmaCausalLM.from_preset(preset_dir)
query = lm.backbone.transformer_layers[0].attention.query_dense.kernel.value
print("query kernel", query.shape, "one device holds", query.addressable_shards[0].data.shape)
assert query.addressable_shards[0].data.shape == (4, 16 // 4, 64)  # head_dim split in 4

# ## LoRA fine-tuning
#
# `enable_lora` freezes the weights and adds two rank-4 factors beside the chosen kernels
# (query and value by default); the layout map places each factor like its kernel, so the
# product a @ b comes out split the same way with no communication. `fit` splits each batch
# of 4 over the 2 replicas.
lm.backbone.enable_lora(rank=4)
lm.compile(
    optimizer=keras.optimizers.Adam(learning_rate=2e-2),
    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    weighted_metrics=[],
)
history = lm.fit(texts, batch_size=4, epochs=6, verbose=0)
losses = history.history["loss"]
print("loss per epoch:", " ".join(f"{loss:.3f}" for loss in losses))
assert losses[-1] < losses[0], losses

# ## Generating
#
# `generate` runs under the same distribution: its prompts are split along "batch" (a
# batch the batch axis does not divide is padded with copies of its last row), and the
# KV caches are split like the attention's keys and values, head_dim over "model".
prompts = ["Keras runs", "A device mesh"]
outputs = lm.generate(prompts, max_length=24, stop_token_ids=None)
for text in outputs:
    print("generated:", repr(text))
assert all(len(text) > len(prompt) for text, prompt in zip(outputs, prompts))

# ## Several hosts
#
# A TPU pod slice or several GPU machines run one Python process per host, each seeing only
# its own devices. Before anything else touches JAX, every process calls
#
#     keras.distribution.initialize(job_addresses="10.0.0.1:1234", num_processes=2,
#                                   process_id=0)   # 1 on the second host
#
# which calls `jax.distributed.initialize(coordinator_address, num_processes, process_id)`:
# JAX needs the coordinator's address (the first of `job_addresses`), how many processes
# there are and which one this is, or reads them from KERAS_DISTRIBUTION_JOB_ADDRESSES,
# KERAS_DISTRIBUTION_NUM_PROCESSES and KERAS_DISTRIBUTION_PROCESS_ID; on Cloud TPU all three
# can be left out. After it, `keras.distribution.list_devices()` lists every host's devices
# and the mesh spans them; the rest of the script is the same on every host.
#
# What changes: each host reads only the shards of its own devices from the checkpoint
# (`from_preset` builds each weight with `jax.make_array_from_callback`, which asks only for
# the shards of this process's devices), so every host needs the preset on its own disk or
# a shared one. A `tf.data` dataset given to `fit` is split per process by the
# distribution. `save_to_preset` reads each weight whole, which a host can do only for
# arrays all of whose shards it holds: from several hosts, gather first
# (`jax.experimental.multihost_utils.process_allgather`) or save from a one-host run.
keras.distribution.set_distribution(None)
print("done")
