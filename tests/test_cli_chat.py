"""`keras-gemma chat` driven through a pseudo-terminal, as a person would use it.

The command runs in its own process with a pty as its controlling terminal, so Ctrl-C is
the terminal's own interrupt (the line discipline turns the byte 0x03 into SIGINT), not a
signal the test sends by hand. `--show-prompt` prints each prompt sent to the model, which
is how the test sees what /reset did to the history.
"""

import os
import pty
import re
import select
import sys
import time

import keras
import pytest

# pty.fork() in a process with JAX's or TensorFlow's threads: safe here, because the child
# calls exec at once and touches no lock.
pytestmark = pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called:RuntimeWarning")


def _read_until(fd, pattern, buffer, timeout=180):
    """Reads from `fd` until `pattern` (a regex) matches the text after `buffer`'s start."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        match = re.search(pattern, buffer[0], re.S)
        if match:
            return match
        ready, _, _ = select.select([fd], [], [], 1.0)
        if ready:
            try:
                data = os.read(fd, 4096)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            buffer[0] += data.decode("utf-8", "replace")
    raise AssertionError(f"no {pattern!r} in the terminal output:\n{buffer[0][-3000:]}")


@pytest.fixture
def chat_terminal(tiny_preset):
    """(write, expect) on a running `keras-gemma chat` attached to a pseudo-terminal."""
    command = [sys.executable, "-m", "keras_gemma", "chat", "--preset", tiny_preset,
               "--system", "Be brief.", "--show-prompt", "--max-new-tokens", "6"]
    environment = dict(os.environ, KERAS_BACKEND=keras.backend.backend(),
                       TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
    if keras.backend.backend() == "torch":
        environment["OMP_NUM_THREADS"] = "1"
    pid, fd = pty.fork()
    if pid == 0:  # the child: the pty is its terminal
        os.execvpe(command[0], command, environment)
    buffer = [""]

    def write(text):
        os.write(fd, text.encode())

    def expect(pattern, timeout=180):
        match = _read_until(fd, pattern, buffer, timeout)
        buffer[0] = buffer[0][match.end():]
        return match

    try:
        yield write, expect
    finally:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)
        os.close(fd)


def test_two_turns_reset_and_exit(chat_terminal):
    write, expect = chat_terminal
    expect(r"/reset forgets.*?> ")
    write("Hello there\n")
    first = expect(r"\[prompt, (\d+) tokens with <bos>\]\r?\n(.*?)\[end of prompt\].*?> ")
    assert first.group(2).count("<start_of_turn>user") == 1
    assert "Be brief." in first.group(2) and "Hello there" in first.group(2)

    write("And again\n")
    second = expect(r"\[prompt, (\d+) tokens with <bos>\]\r?\n(.*?)\[end of prompt\].*?> ")
    # The second prompt carries the first exchange: two user turns and the model's reply.
    assert second.group(2).count("<start_of_turn>user") == 2
    assert second.group(2).count("<start_of_turn>model") == 2
    assert "Hello there" in second.group(2)
    assert int(second.group(1)) > int(first.group(1))

    write("/reset\n")
    expect(r"\(conversation cleared\).*?> ")
    write("Fresh start\n")
    third = expect(r"\[prompt, (\d+) tokens with <bos>\]\r?\n(.*?)\[end of prompt\].*?> ")
    assert third.group(2).count("<start_of_turn>user") == 1
    assert "Hello there" not in third.group(2) and "And again" not in third.group(2)
    assert "Be brief." in third.group(2)  # the system text survives /reset

    write("/exit\n")
    expect(r"$", timeout=30)


def test_ctrl_c_stops_a_reply_and_the_session_goes_on(tiny_preset):
    # A long reply (the tiny random model's greedy text does not end on its own), so the
    # interrupt arrives while it streams.
    max_new_tokens = 4000
    command = [sys.executable, "-m", "keras_gemma", "chat", "--preset", tiny_preset,
               "--max-new-tokens", str(max_new_tokens)]
    environment = dict(os.environ, KERAS_BACKEND=keras.backend.backend(),
                       TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
    pid, fd = pty.fork()
    if pid == 0:
        os.execvpe(command[0], command, environment)
    buffer = [""]
    try:
        _read_until(fd, r"/reset forgets.*?> ", buffer)
        buffer[0] = ""
        os.write(fd, b"Tell me a very long story\n")
        # Wait for the reply to start streaming, then interrupt it from the keyboard.
        _read_until(fd, r"Tell me a very long story\r?\n.+", buffer)
        os.write(fd, b"\x03")
        match = _read_until(fd, r"\[stopped\]\r?\n> ", buffer, timeout=120)
        assert match
        # Still running: the prompt is back and /exit ends the session normally.
        buffer[0] = ""
        os.write(fd, b"/exit\n")
        deadline = time.time() + 60
        while time.time() < deadline:
            finished, status = os.waitpid(pid, os.WNOHANG)
            if finished:
                assert os.waitstatus_to_exitcode(status) == 0
                break
            time.sleep(0.2)
        else:
            raise AssertionError("keras-gemma chat did not end on /exit after a Ctrl-C")
    finally:
        try:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(fd)
