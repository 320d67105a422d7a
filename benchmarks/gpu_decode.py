"""Issue 16's prepared GPU check: torch decode on a GPU as it is (the traced step replayed
from Python) and replayed as one CUDA graph per step, against our JAX, gemma_2b_en shape.

Nothing here is in the package: a CUDA-graph decode path is merged only after a GPU has run
it. One run on a lent GPU machine answers what issue 16 asks there: torch bfloat16 batch 1
against our JAX (target >= 0.8x), batch 8, prefill of a 1,024-token prompt, and how much a
CUDA graph around the traced step gives.

What it runs (each part in fresh processes; random bfloat16 weights written once):
  1. `benchmarks/generate.py --shapes SHAPE --dtypes bfloat16 --backends jax,torch
     --implementations keras_gemma --prompt 1024 --new-tokens 64`: decode tok/s at batch 1
     and 8, prefill time, compile time, per backend.
  2. torch only, batch 1 and 8: `generate()` with the traced step, then with the same traced
     step captured once in a `torch.cuda.CUDAGraph` and replayed (static input buffers;
     each step's inputs copied in, its outputs handed back; the KV caches are written in
     place by the step, at a position held on the device), decode tok/s of each and whether
     the ids are equal. On a CPU (the rehearsal) there is no graph: the same buffers and
     copies run around a plain call, which checks everything but the capture.

On the GPU machine (its image has torch, JAX with CUDA and numpy, not Keras): carry wheels
of keras==3.15.1, namex and optree for Python 3.12 in `.whl` (the device tool's README says
how), then

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site:$PWD python3 benchmarks/gpu_decode.py --dir /tmp/gpu_bench

Rehearsal here: `python benchmarks/gpu_decode.py --shape tiny --prompt 32` (~1 minute).
"""

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import child_process  # noqa: E402
from load_memory import SHAPES, write_checkpoints  # noqa: E402

CHILD = r"""
import json, sys, time
import numpy as np
import torch
import keras_gemma
from keras_gemma.generation.torch_step import TracedStep
path, prompt_length, new_tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
backbone = keras_gemma.GemmaBackbone.from_preset(path, dtype="bfloat16")
model = keras_gemma.GemmaCausalLM(backbone)
weights = len(model.trainable_variables) + len(model.non_trainable_variables)
rng = np.random.default_rng(0)


class GraphReplay:
    # The traced step's function, called through static buffers: captured in a CUDA graph on
    # its first call on a GPU, called plainly on a CPU.
    def __init__(self, traced):
        self.traced, self.graph, self.inputs, self.outputs = traced, None, None, None

    def __call__(self, *arguments):
        weights_part, rest = arguments[:weights], arguments[weights:]
        if self.inputs is None:
            self.inputs = [t.clone() for t in rest]
            if rest[0].is_cuda:
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    for _ in range(2):  # warm-up runs, as torch's CUDA graph docs ask
                        self.traced(*weights_part, *self.inputs)
                torch.cuda.current_stream().wait_stream(stream)
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph):
                    self.outputs = self.traced(*weights_part, *self.inputs)
        for static, given in zip(self.inputs, rest):
            if static.data_ptr() != given.data_ptr():
                static.copy_(given)
        if self.graph is None:
            return self.traced(*weights_part, *self.inputs)
        self.graph.replay()
        return self.outputs


def inputs(batch, width):
    ids = np.zeros((batch, width), "int32")
    ids[:, :prompt_length] = rng.integers(4, backbone.vocabulary_size, (batch, prompt_length))
    mask = np.zeros((batch, width), "int32")
    mask[:, :prompt_length] = 1
    return {"token_ids": ids, "padding_mask": mask}


def timed(data):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    out = model.generate(data, stop_token_ids=None)["token_ids"]
    return time.perf_counter() - started, np.asarray(out)


results = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
for batch in (1, 8):
    full, one = inputs(batch, prompt_length + new_tokens), inputs(batch, prompt_length + 1)
    row = {}
    for kind in ("traced", "graph"):
        model.generator.reset()
        timed(full), timed(one)  # traces the step of each bucket
        if kind == "graph":
            for step in model.generator._functions.values():
                if isinstance(step, TracedStep) and step._traced is not None:
                    step._traced = GraphReplay(step._traced)
        times_full, times_one = [], []
        for _ in range(3):
            seconds, ids = timed(full)
            times_full.append(seconds)
            times_one.append(timed(one)[0])
        row[kind] = {"decode_tokens_per_second": (new_tokens - 1) / (min(times_full) - min(times_one)),
                     "ids": ids.tolist()}
    row["same_ids"] = row["traced"].pop("ids") == row["graph"].pop("ids")
    results[batch] = row
print("RESULT " + json.dumps(results))
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="2b")
    parser.add_argument("--prompt", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--dir", default="/tmp/keras_gemma_gpu_benchmark")
    args = parser.parse_args()
    os.environ.setdefault("KERAS_BACKEND", "torch")
    print("1. generate.py, JAX and torch", flush=True)
    subprocess.run(
        [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "generate.py"),
         "--shapes", args.shape, "--dtypes", "bfloat16", "--backends", "jax,torch",
         "--implementations", "keras_gemma", "--prompt", str(args.prompt),
         "--new-tokens", str(args.new_tokens), "--dir", args.dir],
        check=False,
    )
    print("2. torch: traced step against a CUDA graph of it", flush=True)
    _, ours_dir = write_checkpoints(os.path.join(args.dir, args.shape), SHAPES[args.shape])
    environment = dict(os.environ, KERAS_BACKEND="torch")
    result = child_process.run_child(
        [sys.executable, "-c", CHILD, ours_dir, str(args.prompt), str(args.new_tokens)],
        environment,
    )
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
