"""Load test of an exported SavedModel: N concurrent clients calling `generate_with_length`.

The SavedModel is loaded with `tf.saved_model.load` in this process, which imports only
TensorFlow and tensorflow-text (as a server would, never keras_gemma). Each client thread
sends requests one after another: prompts of mixed lengths (a word to a few hundred
tokens), batches of 1-4 prompts and mixed `max_length`s, drawn from a fixed seeded list.
Greedy decoding makes every answer a function of its request, so each answer is also
compared with the first answer to the same request: a client that got another client's
tokens would show up as a mismatch.

Reported: requests, errors (must be 0), mismatches (must be 0), requests/s, p50/p99 latency,
and the process's resident memory after the warm-up (one request per client) and at the end,
with its largest value in between (must stay flat).

Usage:
    python benchmarks/serve_load.py --saved-model ./served/gemma/1 [--clients 8]
        [--requests 400]
    python benchmarks/serve_load.py --preset gemma3_270m --max-length 64   # exports it first
"""

import argparse
import os
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time

WORDS = ("the model reads a prompt and writes what comes next one token at a time while the "
         "server answers many clients at once").split()


def resident_bytes():
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * resource.getpagesize()


def requests(count, max_length, seed=0):
    """`count` requests `(prompts, max_length)`: mixed prompt lengths, batches, lengths."""
    rng = random.Random(seed)
    distinct = []
    for _ in range(24):
        batch = rng.choice((1, 1, 2, 4))
        prompts = tuple(
            " ".join(rng.choice(WORDS) for _ in range(rng.choice((1, 5, 20, 60, 300))))
            for _ in range(batch)
        )
        distinct.append((prompts, rng.randint(2, max_length)))
    return [distinct[rng.randrange(len(distinct))] for _ in range(count)]


def export(preset, max_length, directory):
    path = os.path.join(directory, "served", "1")
    environment = dict(os.environ, KERAS_BACKEND="tensorflow")
    subprocess.run(
        [sys.executable, "-m", "keras_gemma", "export", preset, path,
         "--max-length", str(max_length)],
        check=True, env=environment,
    )
    return path


def load_test(path, clients, count, max_length):
    import importlib

    import tensorflow as tf

    importlib.import_module("tensorflow_text")  # registers the SentencePiece ops

    generate = tf.saved_model.load(path).signatures["generate_with_length"]

    def call(request):
        prompts, length = request
        texts = generate(prompts=tf.constant(prompts), max_length=tf.constant(length))["text"]
        return tuple(text.decode("utf-8") for text in texts.numpy())

    work = requests(count, max_length)
    # Warm-up: each client's first request, so that what follows measures steady serving.
    threads = [threading.Thread(target=call, args=(work[i],)) for i in range(clients)]
    [thread.start() for thread in threads]
    [thread.join() for thread in threads]
    before = resident_bytes()
    lock = threading.Lock()
    state = {"next": 0, "errors": [], "mismatches": 0, "latencies": [], "answers": {},
             "peak": before}

    def client():
        while True:
            with lock:
                if state["next"] >= len(work):
                    return
                request = work[state["next"]]
                state["next"] += 1
            started = time.perf_counter()
            try:
                answer = call(request)
            except Exception as error:  # counted and reported: a load test must not stop
                with lock:
                    state["errors"].append(repr(error)[:200])
                continue
            elapsed = time.perf_counter() - started
            with lock:
                state["latencies"].append(elapsed)
                first = state["answers"].setdefault(request, answer)
                state["mismatches"] += first != answer
                state["peak"] = max(state["peak"], resident_bytes())

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    [thread.start() for thread in threads]
    [thread.join() for thread in threads]
    seconds = time.perf_counter() - started
    latencies = sorted(state["latencies"])

    def percentile(p):
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] if latencies else 0

    after = resident_bytes()
    print(f"{clients} clients, {len(work)} requests in {seconds:.1f} s: "
          f"{len(latencies) / seconds:.2f} requests/s")
    print(f"latency p50 {percentile(0.50) * 1000:.0f} ms, p99 {percentile(0.99) * 1000:.0f} ms")
    print(f"errors {len(state['errors'])}, answers differing from the same request's first "
          f"{state['mismatches']}")
    print(f"resident memory after warm-up {before / 1e6:.0f} MB, at the end {after / 1e6:.0f} MB"
          f" ({(after - before) / 1e6:+.0f} MB), largest in between {state['peak'] / 1e6:.0f} MB")
    for error in state["errors"][:3]:
        print("  error:", error)
    return not state["errors"] and not state["mismatches"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--saved-model", help="an exported SavedModel directory")
    parser.add_argument("--preset", default="gemma3_270m",
                        help="exported first when --saved-model is not given")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=400)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="keras_gemma_serve_load_") as directory:
        path = args.saved_model or export(args.preset, args.max_length, directory)
        ok = load_test(path, args.clients, args.requests, args.max_length)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
