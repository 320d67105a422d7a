"""keras_gemma's cache of converted checkpoints: where it is, file hashes, atomic writes."""

import contextlib
import hashlib
import json
import os
import sys
import tempfile


def cache_root():
    """keras_gemma's cache: $KERAS_GEMMA_CACHE, else $XDG_CACHE_HOME/keras_gemma or ~/.cache."""
    root = os.environ.get("KERAS_GEMMA_CACHE")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "keras_gemma")
    return root


def write_json_atomically(path, value):
    """Writes `value` as JSON to `path` through a temporary file, so a reader never sees half."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    with os.fdopen(handle, "w") as file:
        json.dump(value, file, indent=1)
    os.replace(temporary, path)


def file_sha256(path):
    """The file's sha256, remembered per (path, size, mtime) so a big file is hashed once."""
    path = os.path.abspath(os.fspath(path))
    stat = os.stat(path)
    memo_path = os.path.join(cache_root(), "gguf", "sha256.json")
    try:
        with open(memo_path) as file:
            memo = json.load(file)
    except (OSError, ValueError):
        memo = {}
    key = [stat.st_size, stat.st_mtime_ns]
    if path in memo and memo[path][:2] == key:
        return memo[path][2]
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 22), b""):
            digest.update(block)
    memo[path] = key + [digest.hexdigest()]
    try:
        write_json_atomically(memo_path, memo)
    except OSError:  # a read-only cache only costs the hash next time
        pass
    return digest.hexdigest()


def conversion_progress(name):
    """A status printer on stderr: one line rewritten in place on a terminal, else a line
    per stage (the text's first word)."""
    tty, last = sys.stderr.isatty(), [None]

    def show(text, final=False):
        line = f"keras_gemma: converting {name} (first load only): {text}"
        if tty:
            sys.stderr.write("\r\033[K" + line + ("\n" if final else ""))
        elif final or text.split(" ")[0] != last[0]:
            sys.stderr.write(line + "\n")
        last[0] = text.split(" ")[0]
        sys.stderr.flush()

    return show


@contextlib.contextmanager
def exclusive(path):
    """Holds an exclusive lock on `path + ".lock"` (POSIX; elsewhere no lock): a second
    process converting the same file waits for the first instead of converting it again.

    Example:
    >>> with exclusive(cache_directory("model.gguf")):
    ...     convert_unless_done()
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
