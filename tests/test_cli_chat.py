"""`keras-gemma chat` driven through a pseudo-terminal, as a person would use it.

The conversation runs in its own process with a pty as its controlling terminal;
`--show-prompt` prints each prompt sent to the model, which is how the test sees what /reset
did to the history. Ctrl-C is tested in this process (see that test for why).
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
    """Ctrl-C while a reply streams: "[stopped]", the part shown kept, the next turn served.

    Run in this process with the interrupt raised between two streamed pieces, where a
    terminal's SIGINT lands (a pty run is timing-dependent: the tiny model's reply may end
    before the keystroke arrives, and a 4,000-token reply costs minutes of CI).
    """
    import io

    from keras_gemma import ChatSession, GemmaCausalLM
    from keras_gemma.cli_chat import _reply

    lm = GemmaCausalLM.from_preset(tiny_preset)
    real_stream = lm.stream

    def interrupted(prompt, max_length=None, stop_token_ids="auto"):
        for count, piece in enumerate(real_stream(prompt, max_length=max_length)):
            if count == 2:
                raise KeyboardInterrupt
            yield piece

    lm.stream = interrupted
    session = ChatSession(lm, max_new_tokens=8)
    out, err = io.StringIO(), io.StringIO()
    _reply(session, "Tell me a long story", False, out, err)
    assert out.getvalue().endswith(" [stopped]\n")
    shown = out.getvalue()[: -len(" [stopped]\n")]
    assert [m["role"] for m in session.messages] == ["user", "model"]
    assert session.messages[1]["content"] == shown  # the part the user saw stays in the history

    lm.stream = real_stream
    reply = session.say("Go on")
    assert isinstance(reply, str)
    assert session.last_prompt.count("<start_of_turn>user") == 2
