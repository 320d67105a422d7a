"""`keras-gemma convert SRC DST`: any checkpoint in, a keras_gemma preset, a transformers
directory or a GGUF file out.

    keras-gemma convert gemma3_270m ./gemma3_270m_hf --to transformers
    keras-gemma convert ./hf_gemma_dir ./my_gemma                   # keras_gemma preset
    keras-gemma convert hf://google/gemma-2b ./gemma-2b-q8_0.gguf --dtype q8_0

SRC is anything `GemmaCausalLM.from_preset` reads: a preset name, a local directory
(keras_gemma, KerasHub or transformers format), a .gguf file, kaggle://... or hf://...
Progress goes to stderr; the written path to stdout.
"""

import os
import sys
import time

TARGETS = ("keras_gemma", "transformers", "gguf")
WEIGHT_DTYPES = ("float32", "bfloat16", "float16")
GGUF_DTYPES = ("f16", "bf16", "q8_0")
EXAMPLES = """examples:
  keras-gemma convert gemma3_270m ./gemma3_270m_hf --to transformers
  keras-gemma convert ./hf_gemma_dir ./my_gemma
  keras-gemma convert ./model.gguf ./my_gemma --dtype bfloat16
  keras-gemma convert kaggle://keras/gemma/keras/gemma_2b_en/3 ./gemma-2b.gguf --dtype q8_0
"""


def add_parser(commands):
    """Adds the `convert` subcommand to an argparse subparsers object."""
    import argparse

    convert = commands.add_parser(
        "convert", help="convert a checkpoint to a keras_gemma preset, transformers or GGUF",
        description="Convert the model SRC into DST. SRC: preset name, local directory "
        "(keras_gemma, KerasHub or transformers), .gguf file, kaggle://... or hf://...",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    convert.add_argument("src", help="the model to read")
    convert.add_argument("dst", help="the directory (or .gguf file) to write")
    convert.add_argument(
        "--to", choices=TARGETS, default=None,
        help="output format (default: gguf when DST ends in .gguf, else keras_gemma)")
    convert.add_argument(
        "--dtype", choices=WEIGHT_DTYPES + GGUF_DTYPES, default=None,
        help="weights dtype: float32, bfloat16 or float16 for keras_gemma and transformers "
        "(default: the source's); f16, bf16 or q8_0 for gguf (default: f16)")
    return convert


class _Progress:
    """Steps and a tensor bar on stderr (rewritten in place on a terminal)."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.start = time.time()

    def __call__(self, text, final=False):
        line = f"keras-gemma: {text} [{time.time() - self.start:.0f} s]"
        if self.tty:
            self.stream.write("\r\033[K" + line + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def tensors(self, text):
        # "encoding tensor 12/80 (q8_0)" -> a bar, on a terminal only (plain logs stay short).
        try:
            done, total = (int(x) for x in text.split()[2].split("/"))
        except (IndexError, ValueError):
            return self(text)
        if self.tty:
            filled = 30 * done // total
            self(f"[{'#' * filled}{'.' * (30 - filled)}] {text}")
        elif done == total:
            self(text)


def _target(args):
    target = args.to or ("gguf" if args.dst.lower().endswith(".gguf") else "keras_gemma")
    dtype = args.dtype
    if target == "gguf" and dtype in WEIGHT_DTYPES:
        raise ValueError(f"--dtype {dtype} is for keras_gemma and transformers output; a GGUF "
                         f"file takes {', '.join(GGUF_DTYPES)}.")
    if target != "gguf" and dtype in GGUF_DTYPES:
        raise ValueError(f"--dtype {dtype} is for GGUF output; {target} takes "
                         f"{', '.join(WEIGHT_DTYPES)}.")
    return target, dtype


def _model_name(src):
    """A name for the GGUF file's general.name: the source's last path part that is not a
    version number ("kaggle://keras/gemma/keras/gemma_2b_en/3" -> "gemma_2b_en")."""
    parts = [p for p in src.replace("\\", "/").split("/") if p and not p.isdigit()]
    return (parts[-1] if parts else "Gemma").removesuffix(".gguf")


def run(args):
    """Runs `convert` for parsed arguments; returns the exit status."""
    progress = _Progress()
    try:
        target, dtype = _target(args)
    except ValueError as error:
        print(f"keras-gemma: error: {error}", file=sys.stderr)
        return 2
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras_gemma

    try:
        progress(f"loading {args.src} ...")
        # GGUF output quantizes from float32; the other formats keep the requested dtype.
        load_dtype = "float32" if target == "gguf" else dtype
        lm = keras_gemma.GemmaCausalLM.from_preset(args.src, dtype=load_dtype)
        progress(f"writing {args.dst} ({target}) ...")
        if target == "keras_gemma":
            path = lm.save_to_preset(args.dst)
        elif target == "transformers":
            from keras_gemma.export.transformers_export import export_to_transformers

            path = export_to_transformers(lm, args.dst)
        else:
            from keras_gemma.export.gguf_export import export_to_gguf

            path = export_to_gguf(lm, args.dst, dtype=dtype or "f16", name=_model_name(args.src),
                                  progress=progress.tensors)
    except (ValueError, TypeError, OSError, ImportError, RuntimeError, MemoryError) as error:
        print(f"keras-gemma: error: {error}", file=sys.stderr)
        return 1
    progress(f"wrote {path}", final=True)
    print(path)
    return 0
