"""Peak memory while loading a 2B-shape bfloat16 checkpoint: keras_gemma against KerasHub.

The benchmark writes a gemma_2b_en-shaped checkpoint of random bfloat16 weights (5.0 GB) in
two layouts, tensor by tensor so that writing it needs little memory: KerasHub's preset
layout (config.json + model.weights.h5, as KerasHub's save_to_preset writes it) and
keras_gemma's (config.json + model.safetensors). Each load then runs in a fresh process that
reports its own peak resident memory (ru_maxrss):

- KerasHub's `GemmaBackbone.from_preset` on the KerasHub preset;
- keras_gemma's `GemmaBackbone.from_preset` on the same KerasHub preset;
- keras_gemma's `GemmaBackbone.from_preset` on its own preset;
- the same under `keras.distribution.ModelParallel` on a (1, 8) mesh of 8 simulated CPU
  devices (JAX only; `--distributed` adds it).

The distributed case places each weight shard by shard as it is read
(`jax.make_array_from_callback` over the memory-mapped file). Its floor is 1x the weights:
the 8 simulated devices are one host's memory, so the shards of every weight, 1/8 each, add
up to the whole model in this process's RSS. What the figure shows beyond 1x is the loader's
own overhead: the largest tensor's transient (the zeros it replaces, while the new shards are
placed), file pages not yet released, and the runtime. On 8 real accelerators the host would
hold only that transient. Measured (one run, a loaded 2-core machine): 6.73 GB peak for
5.01 GB of weights, 1.34x, of which 0.71 GB the runtime held before loading.

With `--int8`: KerasHub's from_preset followed by `quantize("int8")`, against keras_gemma's
`from_preset(..., quantize="int8")`, which builds the int8 variables directly and quantizes
each weight as it is read (one layer in float at a time). The int8 model's weights are
~2.5 GB for the 2B shape; issue 17 asks for at most 1.5x that plus one layer in float32 (the
2.1 GB embedding). Measured (JAX, one run): KerasHub 13.5 GB peak, keras_gemma 4.7 GB;
3.7 GB (JAX) and 3.25 GB (torch) since weights are quantized in blocks of rows.

With `--preflight`: the memory preflight's estimate (keras_gemma/checkpoints/
memory_preflight.py, what `from_preset` compares with the memory available before it
allocates) next to the measured peak, loading keras_gemma's preset in float32, bfloat16 and
int8 (`--preflight-dtypes` picks others, e.g. int4). The estimate is of what the load adds to
the process, so it is compared with the peak less what the process held before the load.
Measured (JAX, gemma_2b_en shape, a 2-core machine shared with other jobs, one run each):

    dtype      estimate GB   peak - before GB   ratio   (before: 0.25 GB)
    float32       13.50          12.49           1.08
    bfloat16       7.13           7.36           0.97
    int8           4.58           4.47           1.02
    int4           4.04           4.11           0.98   (--preflight-dtypes int4)

After quantizing moved to blocks of rows (2026-12-06, `--only-int8 --preflight
--preflight-dtypes int8,int4`): JAX int8 3.92 / 3.45 (1.14), int4 3.24 / 3.13 (1.04); torch,
which writes the blocks in place, int8 3.92 / 2.76, int4 3.24 / 2.12 (the estimate keeps
JAX's figures).

The peaks vary from run to run (bfloat16: 6.73 and 7.36 GB in two runs, float32 12.47-12.71),
which is why the estimate holds 1.3 copies of the largest tensor where one is seen at best.

Usage: python benchmarks/load_memory.py [--dir /tmp/gemma_2b_bf16] [--backend jax]
       [--shape 2b|tiny] [--distributed] [--only-distributed] [--int8] [--only-int8]
       [--preflight] [--preflight-dtypes float32,bfloat16,int8]
"""

import argparse
import json
import os
import subprocess
import sys
import time

import ml_dtypes
import numpy as np

SHAPES = {
    "2b": dict(vocabulary_size=256000, num_layers=18, num_query_heads=8, num_key_value_heads=1,
               hidden_dim=2048, intermediate_dim=32768, head_dim=256),
    "tiny": dict(vocabulary_size=4096, num_layers=2, num_query_heads=4, num_key_value_heads=1,
                 hidden_dim=256, intermediate_dim=1024, head_dim=64),
}


def _tensors(shape):
    """(keras_gemma path, KerasHub h5 path, KerasHub shape, transposition to ours or None)
    for every weight of the architecture: KerasHub stores kernels (in, out), we (out, in)."""
    hidden, heads, kv = shape["hidden_dim"], shape["num_query_heads"], shape["num_key_value_heads"]
    head_dim, width = shape["head_dim"], shape["intermediate_dim"] // 2
    yield "token_embedding/embeddings", "layers/reversible_embedding/vars/0", (shape["vocabulary_size"], hidden), None
    for i in range(shape["num_layers"]):
        ours = f"decoder_block_{i}/"
        theirs = f"layers/gemma_decoder_block{'' if i == 0 else f'_{i}'}/"
        yield ours + "pre_attention_norm/scale", theirs + "pre_attention_norm/vars/0", (hidden,), None
        yield ours + "attention/query/kernel", theirs + "attention/query_dense/vars/0", (heads, hidden, head_dim), (0, 2, 1)
        yield ours + "attention/key/kernel", theirs + "attention/key_dense/vars/0", (kv, hidden, head_dim), (0, 2, 1)
        yield ours + "attention/value/kernel", theirs + "attention/value_dense/vars/0", (kv, hidden, head_dim), (0, 2, 1)
        yield ours + "attention/attention_output/kernel", theirs + "attention/output_dense/vars/0", (heads, head_dim, hidden), (2, 0, 1)
        yield ours + "pre_ffw_norm/scale", theirs + "pre_ffw_norm/vars/0", (hidden,), None
        yield ours + "ffw_gating/kernel", theirs + "gating_ffw/vars/0", (hidden, width), (1, 0)
        yield ours + "ffw_gating_2/kernel", theirs + "gating_ffw_2/vars/0", (hidden, width), (1, 0)
        yield ours + "ffw_linear/kernel", theirs + "ffw_linear/vars/0", (width, hidden), (1, 0)
    yield "final_normalization/scale", "layers/rms_normalization/vars/0", (hidden,), None


def write_checkpoints(directory, shape):
    import h5py

    from keras_gemma.checkpoints.preset_format import FORMAT_VERSION
    from keras_gemma.checkpoints.safetensors_io import write_safetensors

    keras_hub_dir = os.path.join(directory, "keras_hub")
    ours_dir = os.path.join(directory, "keras_gemma")
    ours_config = os.path.join(ours_dir, "config.json")
    if os.path.exists(ours_config):
        with open(ours_config) as file:
            if json.load(file).get("keras_gemma_format") == FORMAT_VERSION:
                return keras_hub_dir, ours_dir
    os.makedirs(keras_hub_dir, exist_ok=True)
    os.makedirs(ours_dir, exist_ok=True)
    rng = np.random.default_rng(0)
    tensors = {}
    with h5py.File(os.path.join(keras_hub_dir, "model.weights.h5"), "w") as h5:
        for ours, theirs, tensor_shape, to_ours in _tensors(shape):
            value = (rng.standard_normal(tensor_shape, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)
            dataset = h5.create_dataset(theirs, data=value.view(np.uint16).view("V2"))
            dataset.attrs["dtype"] = "bfloat16"
            tensors[ours] = value if to_ours is None else np.ascontiguousarray(value.transpose(to_ours))
    config = {
        "module": "keras_hub.src.models.gemma.gemma_backbone",
        "class_name": "GemmaBackbone",
        "config": {**shape, "layer_norm_epsilon": 1e-6, "dropout": 0, "name": "gemma_backbone",
                   "trainable": True, "dtype": {"module": "keras", "class_name": "DTypePolicy",
                                                 "config": {"name": "bfloat16"}, "registered_name": None}},
        "registered_name": "keras_hub>GemmaBackbone",
    }
    with open(os.path.join(keras_hub_dir, "config.json"), "w") as file:
        json.dump(config, file)
    with open(os.path.join(keras_hub_dir, "metadata.json"), "w") as file:
        json.dump({"keras_version": "3.15.1", "keras_hub_version": "0.32.0", "parameter_count": 0}, file)
    write_safetensors(os.path.join(ours_dir, "model.safetensors"), tensors)
    del tensors
    with open(os.path.join(ours_dir, "config.json"), "w") as file:
        json.dump({"keras_gemma_format": FORMAT_VERSION, "backbone": {"class_name": "GemmaBackbone",
                   "config": {**shape, "dtype": "bfloat16"}}, "metadata": {}}, file)
    return keras_hub_dir, ours_dir


LOADER = r"""
import resource, sys, time
started = time.perf_counter()
which, path = sys.argv[1], sys.argv[2]
if which == "distributed":
    import jax, keras, keras_gemma
    assert jax.device_count() == 8, jax.devices()
    mesh = keras.distribution.DeviceMesh((1, 8), ("batch", "model"), jax.devices())
    layout_map = keras_gemma.GemmaBackbone.get_layout_map(mesh)
    keras.distribution.set_distribution(
        keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch"))
    # What the runtime holds before a weight is read (imports, 8 CPU clients).
    keras_gemma.GemmaBackbone(vocabulary_size=8, num_layers=1, num_query_heads=8,
                              num_key_value_heads=1, hidden_dim=8, intermediate_dim=16,
                              head_dim=8)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"BEFORE {before}")
    model = keras_gemma.GemmaBackbone.from_preset(path, dtype="bfloat16")
    embedding = model.token_embedding.embeddings.value
    assert len(embedding.sharding.device_set) == 8, embedding.sharding
    assert embedding.addressable_shards[0].data.shape[0] * 8 == embedding.shape[0]
elif which == "keras_hub":
    import keras_hub
    model = keras_hub.models.GemmaBackbone.from_preset(path, dtype="bfloat16")
elif which == "keras_hub_int8":
    import keras_hub
    model = keras_hub.models.GemmaBackbone.from_preset(path, dtype="bfloat16")
    model.quantize("int8")
elif which == "preflight":
    # argv[3]: a float dtype, or "int8"/"int4" (quantized while loading a bfloat16 model).
    import keras_gemma
    from keras_gemma.checkpoints import loader, memory_preflight
    option = sys.argv[3]
    dtype, quantize = ("bfloat16", option) if option.startswith("int") else (option, None)
    resolved, arguments = loader.backbone_config(path, dtype=dtype, convert=False)
    estimate = memory_preflight.load_estimate(arguments, dtype, resolved.kind, quantize)
    # The resident memory now (ru_maxrss would be the parent's, inherited through fork).
    before = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
    print(f"ESTIMATE {estimate.total} {before}")
    model = keras_gemma.GemmaBackbone.from_preset(path, dtype=dtype, quantize=quantize)
elif which == "keras_gemma_int8":
    import keras_gemma
    model = keras_gemma.GemmaBackbone.from_preset(path, dtype="bfloat16", quantize="int8")
else:
    import keras_gemma
    model = keras_gemma.GemmaBackbone.from_preset(path, dtype="bfloat16")
elapsed = time.perf_counter() - started
print(f"RESULT {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024} {elapsed:.1f}")
"""


def measure(which, path, backend, *options):
    environment = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    if which == "distributed":
        # XLA reads the device count when JAX starts: the loading process gets it set.
        environment.update(KERAS_BACKEND="jax",
                           XLA_FLAGS="--xla_force_host_platform_device_count=8")
    result = subprocess.run([sys.executable, "-c", LOADER, which, path, *options],
                            env=environment, capture_output=True, text=True)
    for line in result.stdout.splitlines():
        if line.startswith("ESTIMATE"):
            measure.estimate = tuple(int(value) for value in line.split()[1:])
        if line.startswith("BEFORE"):
            print(f"  (that process held {int(line.split()[1]) / 1e9:.2f} GB before loading)")
        if line.startswith("RESULT"):
            _, peak, seconds = line.split()
            return int(peak), float(seconds)
    raise RuntimeError(f"{which} failed:\n{result.stderr[-3000:]}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/keras_gemma_load_benchmark")
    parser.add_argument("--backend", default="jax")
    parser.add_argument("--shape", default="2b", choices=sorted(SHAPES))
    parser.add_argument("--distributed", action="store_true",
                        help="also load keras_gemma's preset into a (1, 8) mesh (JAX)")
    parser.add_argument("--only-distributed", action="store_true",
                        help="only the (1, 8) mesh case")
    parser.add_argument("--int8", action="store_true",
                        help="also load into int8: KerasHub loads then quantizes, keras_gemma "
                        "quantizes while loading (from_preset(..., quantize='int8'))")
    parser.add_argument("--only-int8", action="store_true", help="only the int8 rows")
    parser.add_argument("--preflight", action="store_true",
                        help="only the memory preflight's estimate against the measured peak")
    parser.add_argument("--preflight-dtypes", default="float32,bfloat16,int8",
                        help="the loads --preflight measures: float dtypes, int8, int4")
    args = parser.parse_args()
    shape = SHAPES[args.shape]
    directory = os.path.join(args.dir, args.shape)
    started = time.perf_counter()
    keras_hub_dir, ours_dir = write_checkpoints(directory, shape)
    print(f"checkpoints ready in {time.perf_counter() - started:.0f} s under {directory}")
    from keras_gemma import GemmaBackbone

    weight_bytes = GemmaBackbone.parameter_count(shape) * 2
    rows = [
        ("KerasHub from_preset (KerasHub preset)", "keras_hub", keras_hub_dir),
        ("keras_gemma from_preset (KerasHub preset)", "keras_gemma", keras_hub_dir),
        ("keras_gemma from_preset (keras_gemma preset)", "keras_gemma", ours_dir),
    ]
    distributed = ("keras_gemma, (1, 8) mesh, 8 CPU devices", "distributed", ours_dir)
    int8_rows = [
        ("KerasHub from_preset, then quantize('int8')", "keras_hub_int8", keras_hub_dir),
        ("keras_gemma from_preset(quantize='int8')", "keras_gemma_int8", ours_dir),
    ]
    if args.only_int8:
        rows = int8_rows
    elif args.int8:
        rows += int8_rows
    if args.only_distributed:
        rows = [distributed]
    elif args.distributed:
        rows.append(distributed)
    if args.preflight:
        preflight_table(ours_dir, args.backend, args.preflight_dtypes.split(","))
        return
    print(f"backend {args.backend}; bfloat16 weights: {weight_bytes / 1e9:.2f} GB")
    print(f"{'loader':48s} {'peak RSS GB':>11s} {'x weights':>9s} {'seconds':>8s}")
    for label, which, path in rows:
        peak, seconds = measure(which, path, args.backend)
        print(f"{label:48s} {peak / 1e9:11.2f} {peak / weight_bytes:9.2f} {seconds:8.1f}")


def preflight_table(path, backend, options):
    """The preflight's estimate of each load against its measured peak (fresh processes)."""
    print(f"backend {backend}; keras_gemma preset {path}")
    print(f"{'dtype':10s} {'estimate GB':>11s} {'before GB':>9s} {'peak GB':>8s} "
          f"{'peak - before':>13s} {'ratio':>6s} {'seconds':>8s}")
    for option in options:
        peak, seconds = measure("preflight", path, backend, option)
        estimate, before = measure.estimate
        ratio = estimate / (peak - before)
        print(f"{option:10s} {estimate / 1e9:11.2f} {before / 1e9:9.2f} {peak / 1e9:8.2f} "
              f"{(peak - before) / 1e9:13.2f} {ratio:6.2f} {seconds:8.1f}")


if __name__ == "__main__":
    main()
