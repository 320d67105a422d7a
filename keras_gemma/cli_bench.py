"""`keras-gemma bench PRESET`: how fast one preset decodes on this machine, and its memory.

    keras-gemma bench gemma3_270m
    KERAS_BACKEND=torch keras-gemma bench gemma3_270m --dtype bfloat16 --batch-size 4

Method (the same as benchmarks/generate.py, which compares with KerasHub): random prompts
of `--prompt-length` tokens; decode tokens/s per sequence is (N - 1) / (time for N new
tokens - time for 1 new token), the best of `--repeats` warm calls, so prefill and compile
drop out; compile time is the first call minus the best warm one. Peak memory is the
process's peak resident set (weights, caches, compiled code, the framework itself).
"""

import json
import os
import resource
import sys
import time


def add_bench_command(commands, dtypes, positive_int):
    """Adds the `bench` subcommand to the `keras-gemma` parser's subparsers."""
    import argparse

    bench = commands.add_parser(
        "bench",
        help="measure one preset's decode speed and memory on this machine",
        description=(__doc__.split("\n\n", 2)[2]
                     + "\nexample:\n  keras-gemma bench gemma3_270m --new-tokens 64"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_argument("preset", help="preset name, directory, .gguf file or handle")
    bench.add_argument("--dtype", choices=dtypes, default=None, help="dtype of the weights")
    bench.add_argument("--batch-size", type=positive_int, default=1, help="sequences decoded together")
    bench.add_argument("--prompt-length", type=positive_int, default=16, help="prompt tokens")
    bench.add_argument("--new-tokens", type=positive_int, default=32, help="tokens decoded (>= 2)")
    bench.add_argument("--repeats", type=positive_int, default=3, help="warm calls timed (best kept)")
    bench.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    return bench


def measure(causal_lm, batch_size, prompt_length, new_tokens, repeats, seed=0):
    """Decode speed and compile time of `causal_lm` on random prompts (a dict of figures)."""
    import numpy as np

    if new_tokens < 2:
        raise ValueError(f"new_tokens must be at least 2 (decode speed needs two lengths); got {new_tokens}.")
    vocabulary = causal_lm.backbone.vocabulary_size
    rng = np.random.default_rng(seed)
    prompts = rng.integers(4, vocabulary, size=(batch_size, prompt_length)).astype("int32")

    def timed(width):
        ids = np.zeros((batch_size, width), "int32")
        ids[:, :prompt_length] = prompts
        mask = np.zeros((batch_size, width), "int32")
        mask[:, :prompt_length] = 1
        started = time.perf_counter()
        causal_lm.generate({"token_ids": ids, "padding_mask": mask}, stop_token_ids=None)
        return time.perf_counter() - started

    full, one = prompt_length + new_tokens, prompt_length + 1
    first_full, first_one = timed(full), timed(one)
    best_full = min(timed(full) for _ in range(repeats))
    best_one = min(timed(one) for _ in range(repeats))
    decode_seconds = max(best_full - best_one, 1e-9)
    return {
        "decode_tokens_per_second": (new_tokens - 1) / decode_seconds,
        "prefill_seconds": best_one,
        "compile_seconds": max(first_full - best_full, 0.0) + max(first_one - best_one, 0.0),
    }


def run_bench(args, stdout=None, stderr=None):
    from keras_gemma.cli import _Status

    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    status = _Status(stderr)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    status.show(f"keras-gemma: loading {args.preset} ...")
    import keras

    import keras_gemma

    started = time.perf_counter()
    try:
        lm = keras_gemma.GemmaCausalLM.from_preset(args.preset, dtype=args.dtype)
        load_seconds = time.perf_counter() - started
        status.show(f"keras-gemma: measuring {args.preset} ...")
        figures = measure(lm, args.batch_size, args.prompt_length, args.new_tokens, args.repeats)
    except (ValueError, TypeError, OSError, ImportError, RuntimeError, MemoryError) as error:
        status.clear()
        print(f"keras-gemma: error: {error}", file=stderr)
        return 1
    status.clear()
    figures = {
        "preset": args.preset,
        "backend": keras.backend.backend(),
        "dtype": lm.backbone.dtype_policy.name,
        "parameters": lm.backbone.count_params(),
        "batch_size": args.batch_size,
        "prompt_length": args.prompt_length,
        "new_tokens": args.new_tokens,
        "load_seconds": load_seconds,
        **figures,
        # Linux reports ru_maxrss in KiB.
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
    }
    if args.json:
        stdout.write(json.dumps(figures) + "\n")
        return 0
    stdout.write(
        f"{figures['preset']} on {figures['backend']} ({figures['dtype']}, "
        f"{figures['parameters']:,} parameters), batch {args.batch_size}, "
        f"prompt {args.prompt_length} tokens:\n"
        f"  decode   {figures['decode_tokens_per_second']:.1f} tokens/s per sequence\n"
        f"  prefill  {figures['prefill_seconds']:.3f} s (prompt and one new token)\n"
        f"  compile  {figures['compile_seconds']:.1f} s\n"
        f"  load     {figures['load_seconds']:.1f} s\n"
        f"  memory   {figures['peak_rss_gb']:.2f} GB peak resident\n"
    )
    return 0
