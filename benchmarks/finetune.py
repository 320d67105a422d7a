"""Fine-tuning speed and memory: keras_gemma's GemmaCausalLM against KerasHub's, same weights.

Every measurement runs in a fresh child process (benchmarks/child_process.py) that loads one
checkpoint of random weights (written once, in both layouts, by load_memory.py's writer),
builds the task model without a preprocessor, sets up the configuration, compiles both
models alike (AdamW 1e-4, sparse cross-entropy from logits, weighted accuracy, Keras'
default jit_compile) and runs `fit` on the same token batches (seeded). It reports:

- train tokens/s after the first step (mean over steps 2..N) and the best single step;
- the first step's time (compile + one step);
- peak RSS of the child (its VmHWM, includes loading);
- `--implementations keras_gemma_remat` is ours built under `keras.RematScope` (every
  decoder block recomputed in the backward pass), for long sequences;
- trainable parameters and the loss Keras reports after N steps;
- model FLOP/s: matmul FLOPs per step (forward 2 per weight and token; the backward's input
  gradient 2 more; weight gradients 2 more for the trained ones) over the best step.

Configurations: lora_float32, lora_bfloat16, lora_mixed_bfloat16, lora_int8 (float32 base
quantized to int8, then LoRA; KerasHub loads in float and quantizes, keras_gemma quantizes
while loading), lora_int8-bfloat16 (bfloat16 base), full_float32,
full_bfloat16. The 2B bfloat16 KerasHub child peaks near 20 GB: on a shared 24 GB machine run
it alone (or leave it out with --implementations keras_gemma). LoRA is rank 4 on query and
value (KerasHub's default targets). `--matmul` also times a large float32 matmul per backend
(the compute roof these FLOP/s are read against; on torch the faster of its default
product and oneDNN's).

Runs alternate the implementations (ours, KerasHub, ours, ...) for `--rounds` rounds and
keep each one's best, so that a machine shared with other work treats both alike.

Usage:
    python benchmarks/finetune.py --shapes 2b --configs lora_float32,lora_int8 --backends jax
    python benchmarks/finetune.py --shapes small --configs full_float32 \\
        --backends jax,tensorflow,torch --steps 6 --batch 4 --rounds 2
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import child_process  # noqa: E402
from load_memory import SHAPES, write_checkpoints  # noqa: E402

SHAPES = dict(SHAPES, small=dict(
    vocabulary_size=16384, num_layers=4, num_query_heads=8, num_key_value_heads=1,
    hidden_dim=512, intermediate_dim=4096, head_dim=64))

CHILD = r"""
import json, os, resource, sys, time
import numpy as np
implementation, path, config, steps, batch, length = sys.argv[1:7]
steps, batch, length = int(steps), int(batch), int(length)
import keras
if keras.backend.backend() == "torch":
    import torch
    torch.set_num_threads(int(os.environ.get("BENCH_TORCH_THREADS", "2")))
kind, _, dtype = config.partition("_")
quantize = dtype.startswith("int8")
if quantize:  # lora_int8: a float32 model quantized; lora_int8-bfloat16: a bfloat16 one
    dtype = dtype.partition("-")[2] or "float32"
if implementation == "keras_hub":
    import keras_hub
    backbone = keras_hub.models.GemmaBackbone.from_preset(path, dtype=dtype)
    model = keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)
else:
    import keras_gemma
    blocks = [f"decoder_block_{index}" for index in range(64)]
    remat = implementation == "keras_gemma_remat"  # README's keras.RematScope recipe
    with keras.RematScope(mode="list_of_layers" if remat else None, layer_names=blocks):
        # int8: quantized while loading (one layer in float at a time), as a user would.
        backbone = keras_gemma.GemmaBackbone.from_preset(
            path, dtype=dtype, quantize="int8" if quantize else None)
    model = keras_gemma.GemmaCausalLM(backbone, compile=False)
if quantize and implementation == "keras_hub":
    model.quantize("int8")  # KerasHub loads in float, then quantizes
if kind == "lora":
    backbone.enable_lora(rank=4)
model.compile(
    optimizer=keras.optimizers.AdamW(learning_rate=1e-4),
    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    weighted_metrics=[keras.metrics.SparseCategoricalAccuracy()],
)
vocabulary = backbone.vocabulary_size
rng = np.random.default_rng(0)
ids = rng.integers(4, vocabulary, size=(steps * batch, length + 1)).astype("int32")
x = {"token_ids": ids[:, :-1], "padding_mask": np.ones((steps * batch, length), "int32")}
y = ids[:, 1:]

def peak_rss_gb():
    # VmHWM is this process's own peak; ru_maxrss starts at the parent's RSS when it forked
    # (a driver that had just written the 2B checkpoints passed its 6.4 GB on to every child).
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9

class Clock(keras.callbacks.Callback):
    def on_train_batch_begin(self, index, logs=None):
        self.begin = time.perf_counter()
    def on_train_batch_end(self, index, logs=None):
        times.append(time.perf_counter() - self.begin)
        losses.append(float(logs["loss"]))

times, losses = [], []
model.fit(x, y, sample_weight=x["padding_mask"], batch_size=batch, epochs=1, shuffle=False,
          verbose=0, callbacks=[Clock()])
trainable = int(sum(np.prod(v.shape) for v in model.trainable_weights))
tokens = batch * length
warm = times[1:] or times
print("RESULT " + json.dumps({
    "tokens_per_second": tokens * len(warm) / sum(warm),
    "best_tokens_per_second": tokens / min(warm),
    "first_step_seconds": times[0],
    "peak_rss_gb": peak_rss_gb(),
    "trainable": trainable,
    "loss": losses[-1],
}))
"""

MATMUL = r"""
import json, os, time
import numpy as np
import keras
from keras import ops
if keras.backend.backend() == "torch":
    import torch
    torch.set_num_threads(int(os.environ.get("BENCH_TORCH_THREADS", "2")))
n = 2048
a = ops.convert_to_tensor(np.random.default_rng(0).standard_normal((n, 8 * n), "float32"))
b = ops.convert_to_tensor(np.random.default_rng(1).standard_normal((8 * n, n), "float32"))
if keras.backend.backend() == "jax":
    import jax
    product = jax.jit(lambda a, b: a @ b)
elif keras.backend.backend() == "tensorflow":
    import tensorflow as tf
    product = tf.function(lambda a, b: a @ b, jit_compile=True)
else:
    product = lambda a, b: a @ b
def gflops(product):
    ops.convert_to_numpy(product(a, b))
    best = float("inf")
    for _ in range(4):
        started = time.perf_counter()
        ops.convert_to_numpy(product(a, b))
        best = min(best, time.perf_counter() - started)
    return 2 * n * 8 * n * n / best / 1e9

result = {"gflops": gflops(product)}
if keras.backend.backend() == "torch":
    # torch's default float32 product is MKL's; oneDNN's can be twice it (on AMD CPUs).
    from keras_gemma.layers import torch_product_choice
    if torch_product_choice.onednn_available():
        weight = b.T.contiguous()
        result["default_gflops"] = result["gflops"]
        result["gflops"] = max(result["gflops"], gflops(lambda a, b: torch.ops.mkldnn._linear_pointwise(
            a, weight, None, "none", [], "")))
print("RESULT " + json.dumps(result))
"""


def step_flops(shape, config, tokens):
    """Matmul FLOPs of one training step (the attention scores add a few percent)."""
    hidden, heads, kv = shape["hidden_dim"], shape["num_query_heads"], shape["num_key_value_heads"]
    head_dim, width = shape["head_dim"], shape["intermediate_dim"] // 2
    per_layer = hidden * head_dim * (2 * heads + 2 * kv) + 3 * hidden * width
    weights = shape["num_layers"] * per_layer + shape["vocabulary_size"] * hidden  # tied logits
    # Forward 2, input gradient 2, and for full fine-tuning the weight gradients 2.
    return (6 if config.startswith("full") else 4) * weights * tokens


def run(implementation, path, config, backend, args):
    environment = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    command = [sys.executable, "-c", CHILD, implementation, path, config,
               str(args.steps), str(args.batch), str(args.length)]
    return child_process.run_child(command, environment)


def best_of(results):
    good = [r for r in results if "error" not in r]
    if not good:
        return results[-1]
    best = dict(max(good, key=lambda r: r["best_tokens_per_second"]))
    best["tokens_per_second"] = max(r["tokens_per_second"] for r in good)
    best["peak_rss_gb"] = min(r["peak_rss_gb"] for r in good)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="small")
    parser.add_argument("--configs", default="lora_float32,full_float32")
    parser.add_argument("--backends", default="jax,torch")
    parser.add_argument("--implementations", default="keras_gemma,keras_hub")
    parser.add_argument("--steps", type=int, default=4, help="fit steps; the first is compile")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--matmul", action="store_true")
    parser.add_argument("--dir", default="/tmp/keras_gemma_finetune_benchmark")
    args = parser.parse_args()
    os.environ.setdefault("KERAS_BACKEND", args.backends.split(",")[0])

    roofs = {}
    if args.matmul:
        for backend in args.backends.split(","):
            environment = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
            roofs[backend] = child_process.run_child([sys.executable, "-c", MATMUL], environment)
            print(f"float32 matmul {backend}: {json.dumps(roofs[backend])}", flush=True)
    rows = []
    for shape_name in args.shapes.split(","):
        shape = SHAPES[shape_name]
        keras_hub_dir, ours_dir = write_checkpoints(os.path.join(args.dir, shape_name), shape)
        paths = {"keras_hub": keras_hub_dir, "keras_gemma": ours_dir,
                 "keras_gemma_remat": ours_dir}
        for config in args.configs.split(","):
            for backend in args.backends.split(","):
                found = {name: [] for name in args.implementations.split(",")}
                for _ in range(args.rounds):
                    for name in found:
                        result = run(name, paths[name], config, backend, args)
                        found[name].append(result)
                        print(f"{shape_name} {config} {backend} {name}: {json.dumps(result)}",
                              flush=True)
                best = {name: best_of(results) for name, results in found.items()}
                flops = step_flops(shape, config, args.batch * args.length)
                rows.append((shape_name, config, backend, best, flops))
    print_table(rows, roofs, args)


def print_table(rows, roofs, args):
    print(f"\nbatch {args.batch} x {args.length} tokens, {args.steps} steps, best of "
          f"{args.rounds} round(s)")
    print(f"{'shape':6s} {'config':20s} {'backend':10s} {'impl':17s} {'tok/s':>7s} {'best':>7s} "
          f"{'first s':>8s} {'RSS GB':>7s} {'trainable':>11s} {'loss':>7s} {'GFLOP/s':>8s}")
    for shape, config, backend, best, flops in rows:
        for name, result in best.items():
            if "error" in result:
                print(f"{shape:6s} {config:20s} {backend:10s} {name:17s} ERROR {result['error']}")
                continue
            gflops = flops * result["best_tokens_per_second"] / (args.batch * args.length) / 1e9
            print(f"{shape:6s} {config:20s} {backend:10s} {name:17s} "
                  f"{result['tokens_per_second']:7.1f} {result['best_tokens_per_second']:7.1f} "
                  f"{result['first_step_seconds']:8.1f} {result['peak_rss_gb']:7.2f} "
                  f"{result['trainable']:11,d} {result['loss']:7.3f} {gflops:8.1f}")
        ours, theirs = best.get("keras_gemma", {}), best.get("keras_hub", {})
        if "tokens_per_second" in ours and "tokens_per_second" in theirs:
            print(f"{'':50s}ours / KerasHub: tok/s "
                  f"{ours['tokens_per_second'] / theirs['tokens_per_second']:.2f}x, best step "
                  f"{ours['best_tokens_per_second'] / theirs['best_tokens_per_second']:.2f}x, "
                  f"first step {ours['first_step_seconds'] / theirs['first_step_seconds']:.2f}x, "
                  f"peak RSS {ours['peak_rss_gb'] / theirs['peak_rss_gb']:.2f}x")
    for backend, roof in roofs.items():
        if "gflops" in roof:
            print(f"float32 matmul roof {backend}: {roof['gflops']:.1f} GFLOP/s")


if __name__ == "__main__":
    main()
