"""Generation speed: keras_gemma's GemmaCausalLM against KerasHub's, same weights, one run.

For each shape (tiny; gemma_2b_en with random weights), dtype and backend, every model runs
in a fresh process and reports: decode tokens/s at batch 1 and 8 (per sequence), prefill time
(the prompt plus one token), compile time (first call minus a warm call) and peak RSS. Both
implementations load one checkpoint written here in KerasHub's preset layout, so the weights
are the same. Timings are the best of `--repeats` warm calls; decode speed is
(N - 1) / (time for N new tokens - time for 1 new token).

Usage:
    python benchmarks/generate.py --shapes tiny --backends jax,torch
    python benchmarks/generate.py --shapes 2b --dtypes float32,bfloat16 --new-tokens 8
    python benchmarks/generate.py --shapes 2b --dtypes int8,int4 --implementations keras_gemma
    python benchmarks/generate.py --backends jax,torch,inductor   # inductor: torch with the
        # Inductor-compiled decode step (KERAS_GEMMA_TORCH_COMPILE=1), keras_gemma only

dtypes "int8" and "int4": KerasHub loads the float32 checkpoint and calls `quantize(mode)`
(its peak RSS then includes the float32 model); keras_gemma loads its own preset of the same
weights with `from_preset(..., quantize=mode)`, which quantizes each weight as it is read
and never holds the float32 model (the way a user with little memory loads it).
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import child_process  # noqa: E402
from load_memory import SHAPES, write_checkpoints  # noqa: E402

CHILD = r"""
import json, os, resource, sys, time
import numpy as np
implementation, path, ours_path, dtype, prompt_length, new_tokens, repeats = sys.argv[1:8]
prompt_length, new_tokens, repeats = int(prompt_length), int(new_tokens), int(repeats)
import keras
if keras.backend.backend() == "torch":
    import torch
    torch.set_num_threads(int(os.environ.get("BENCH_TORCH_THREADS", "2")))
# "int8" / "int4": the float32 checkpoint, then each library's own `quantize(mode)`.
quantize = dtype if dtype in ("int8", "int4") else None
dtype = "float32" if quantize else dtype
if implementation == "keras_hub":
    import keras_hub
    backbone = keras_hub.models.GemmaBackbone.from_preset(path, dtype=dtype)
    model = keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)
    if quantize:
        model.quantize(quantize)
elif quantize:
    import keras_gemma
    backbone = keras_gemma.GemmaBackbone.from_preset(ours_path, dtype=dtype, quantize=quantize)
    model = keras_gemma.GemmaCausalLM(backbone)
else:
    import keras_gemma
    backbone = keras_gemma.GemmaBackbone.from_preset(path, dtype=dtype)
    model = keras_gemma.GemmaCausalLM(backbone)
vocabulary = backbone.vocabulary_size
rng = np.random.default_rng(0)

def inputs(batch, width):
    ids = np.zeros((batch, width), dtype="int32")
    ids[:, :prompt_length] = rng.integers(4, vocabulary, size=(batch, prompt_length))
    mask = np.zeros((batch, width), dtype="int32")
    mask[:, :prompt_length] = 1
    return {"token_ids": ids, "padding_mask": mask}

def timed(batch, width):
    data = inputs(batch, width)
    started = time.perf_counter()
    model.generate(data, stop_token_ids=None)
    return time.perf_counter() - started

results = {}
for batch in (1, 8):
    full, one = prompt_length + new_tokens, prompt_length + 1
    first = timed(batch, full)
    first_one = timed(batch, one)
    best_full = min(timed(batch, full) for _ in range(repeats))
    best_one = min(timed(batch, one) for _ in range(repeats))
    results[batch] = {
        "decode_tokens_per_second": (new_tokens - 1) / max(best_full - best_one, 1e-9),
        "prefill_seconds": best_one,
        "compile_seconds": max(first - best_full, 0.0) + max(first_one - best_one, 0.0),
    }
results["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
print("RESULT " + json.dumps(results))
"""


def run_child(implementation, path, ours_path, dtype, backend, args):
    environment = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    if backend == "inductor":
        # torch, with keras_gemma's Inductor-compiled decode step (torch_compiled_step.py)
        environment.update(KERAS_BACKEND="torch", KERAS_GEMMA_TORCH_COMPILE="1")
    command = [sys.executable, "-c", CHILD, implementation, path, ours_path, dtype,
               str(args.prompt), str(args.new_tokens), str(args.repeats)]
    return child_process.run_child(command, environment)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="tiny")
    parser.add_argument("--dtypes", default="float32")
    parser.add_argument("--backends", default="jax,torch")
    parser.add_argument("--implementations", default="keras_hub,keras_gemma")
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default="/tmp/keras_gemma_load_benchmark")
    args = parser.parse_args()

    # This process only writes checkpoints, but importing keras_gemma imports Keras, whose
    # default backend (TensorFlow) may not be installed (a GPU machine with JAX and torch).
    os.environ.setdefault("KERAS_BACKEND", args.backends.split(",")[0])
    rows = []
    for shape in args.shapes.split(","):
        keras_hub_dir, ours_dir = write_checkpoints(os.path.join(args.dir, shape), SHAPES[shape])
        for dtype in args.dtypes.split(","):
            for backend in args.backends.split(","):
                found = {}
                for implementation in args.implementations.split(","):
                    if backend == "inductor" and implementation != "keras_gemma":
                        continue
                    result = run_child(implementation, keras_hub_dir, ours_dir, dtype, backend,
                                       args)
                    found[implementation] = result
                    print(f"{shape} {dtype} {backend} {implementation}: {json.dumps(result)}",
                          flush=True)
                rows.append((shape, dtype, backend, found))

    print()
    header = (f"{'shape':6s} {'dtype':9s} {'backend':8s} {'impl':11s} {'b1 tok/s':>9s} "
              f"{'b8 tok/s':>9s} {'prefill s':>9s} {'compile s':>9s} {'RSS GB':>7s}")
    print(header)
    for shape, dtype, backend, found in rows:
        for implementation, result in found.items():
            if "error" in result:
                print(f"{shape:6s} {dtype:9s} {backend:8s} {implementation:11s} ERROR {result['error']}")
                continue
            print(f"{shape:6s} {dtype:9s} {backend:8s} {implementation:11s} "
                  f"{result['1']['decode_tokens_per_second']:9.2f} "
                  f"{result['8']['decode_tokens_per_second']:9.2f} "
                  f"{result['1']['prefill_seconds']:9.2f} "
                  f"{result['1']['compile_seconds']:9.1f} {result['peak_rss_gb']:7.2f}")
        ours, theirs = found.get("keras_gemma", {}), found.get("keras_hub", {})
        if "1" in ours and "1" in theirs:
            ratio1 = ours["1"]["decode_tokens_per_second"] / theirs["1"]["decode_tokens_per_second"]
            ratio8 = ours["8"]["decode_tokens_per_second"] / theirs["8"]["decode_tokens_per_second"]
            memory = ours["peak_rss_gb"] / theirs["peak_rss_gb"]
            print(f"{'':27s} ratio keras_gemma / KerasHub: batch 1 {ratio1:.2f}x, "
                  f"batch 8 {ratio8:.2f}x, peak RSS {memory:.2f}x")


if __name__ == "__main__":
    main()
