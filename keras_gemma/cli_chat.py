"""`keras-gemma chat`: an interactive, streaming, multi-turn conversation in the terminal.

    keras-gemma chat                                    # gemma3_270m, offline
    keras-gemma chat --preset gemma2_instruct_2b_en --system "Answer briefly."

Type a message and press Enter; the reply streams as it is decoded. `/reset` forgets the
conversation, `/exit` (or Ctrl-D) ends it, Ctrl-C stops a reply without ending the session.
The turns go through the model's chat template (`keras_gemma.ChatSession`).
"""

import os
import sys
import time

HELP = "commands: /reset forgets the conversation, /exit ends it; Ctrl-C stops a reply"


def add_chat_command(commands, default_preset, dtypes, samplers, positive_int):
    """Adds the `chat` subcommand to the `keras-gemma` parser's subparsers."""
    chat = commands.add_parser(
        "chat",
        help="talk with a model in the terminal, several turns, through its chat template",
        description=(
            "Chat with PRESET: type a message, the reply streams back. /reset forgets the "
            "conversation, /exit or Ctrl-D ends it, Ctrl-C stops a reply.\n\n"
            "example:\n  keras-gemma chat --preset gemma2_instruct_2b_en "
            '--system "Answer in one sentence."'
        ),
        formatter_class=__import__("argparse").RawDescriptionHelpFormatter,
    )
    chat.add_argument("--preset", default=default_preset,
                      help=f"preset name, directory, .gguf file or handle (default: {default_preset})")
    chat.add_argument("--system", default=None, help="instructions placed before the first turn")
    chat.add_argument("--max-new-tokens", type=positive_int, default=256,
                      help="the longest reply, in tokens (default: 256)")
    chat.add_argument("--sampler", choices=samplers, default="greedy",
                      help="how the next token is picked (default: greedy)")
    chat.add_argument("--seed", type=int, default=None, help="seed of a random sampler")
    chat.add_argument("--dtype", choices=dtypes, default=None, help="dtype of the weights")
    chat.add_argument("--show-prompt", action="store_true",
                      help="print each prompt sent to the model (and its token count) on stderr")
    return chat


def run_chat(args, stdin=None, stdout=None, stderr=None):
    """Runs the conversation loop until /exit or end of input; returns the exit status."""
    from keras_gemma.cli import _sampler, _Status

    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    status = _Status(stderr)
    status.show(f"keras-gemma: loading {args.preset} ...")
    start = time.time()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    import keras_gemma

    try:
        lm = keras_gemma.GemmaCausalLM.from_preset(args.preset, dtype=args.dtype)
        lm.compile(sampler=_sampler(args.sampler, args.seed))
        session = keras_gemma.ChatSession(
            lm, system=args.system, max_new_tokens=args.max_new_tokens
        )
    except (ValueError, TypeError, OSError, ImportError, RuntimeError, MemoryError) as error:
        status.clear()
        print(f"keras-gemma: error: {error}", file=stderr)
        return 1
    status.clear()
    print(f"keras-gemma chat: {args.preset} ({keras.backend.backend()}, loaded in "
          f"{time.time() - start:.1f} s). {HELP}", file=stderr, flush=True)
    while True:
        stdout.write("> ")
        stdout.flush()
        try:
            line = stdin.readline()
        except KeyboardInterrupt:  # Ctrl-C at the prompt drops the line being typed
            stdout.write("\n")
            continue
        if not line:  # end of input (Ctrl-D)
            stdout.write("\n")
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            session.reset()
            print("(conversation cleared)", file=stdout, flush=True)
            continue
        if text.startswith("/"):
            print(f"unknown command {text.split()[0]!r}; {HELP}", file=stdout, flush=True)
            continue
        _reply(session, text, args.show_prompt, stdout, stderr)


def _reply(session, text, show_prompt, stdout, stderr):
    if show_prompt:
        prompt = session.prompt(text)
        tokens = len(session.tokenizer.tokenize(prompt)) + 1
        print(f"[prompt, {tokens} tokens with <bos>]\n{prompt}[end of prompt]", file=stderr,
              flush=True)
    pieces = session.stream(text)
    try:
        for piece in pieces:
            stdout.write(piece)
            stdout.flush()
    except KeyboardInterrupt:
        pieces.close()  # stores the part shown as the model's turn
        stdout.write(" [stopped]")
    except ValueError as error:  # e.g. the conversation outgrew what the model takes
        pieces.close()
        print(f"\nkeras-gemma: error: {error} (/reset starts over)", file=stderr, flush=True)
    stdout.write("\n")
    stdout.flush()
