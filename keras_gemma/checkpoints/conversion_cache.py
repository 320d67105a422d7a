"""keras_gemma's cache of converted checkpoints: where it is, file hashes, atomic writes, and
the completion marker that a reader checks before it trusts an entry.

An entry is a directory written whole (keras_gemma.atomic_write), then `COMPLETE_FILE` is
written last: every file's size, and its sha256 where hashing it on each load is cheap. A
reader (`entry_problem`) trusts an entry only when the marker is there and every file matches
it; anything else (a kill before the marker, a truncated or altered file, an older
converter) is converted again with a one-line notice.
"""

import contextlib
import hashlib
import json
import os
import sys

from keras_gemma.atomic_write import write_file_atomically

COMPLETE_FILE = "conversion_complete.json"
# Files up to this size are hashed on every load (milliseconds); larger ones (the float32
# weights, gigabytes) are checked by size, which catches a truncated copy.
CHECKSUM_LIMIT = 64 << 20


def cache_root():
    """keras_gemma's cache: $KERAS_GEMMA_CACHE, else $XDG_CACHE_HOME/keras_gemma or ~/.cache."""
    root = os.environ.get("KERAS_GEMMA_CACHE")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "keras_gemma")
    return root


def write_json_atomically(path, value):
    """Writes `value` as JSON to `path` through a temporary file, so a reader never sees half."""
    write_file_atomically(path, json.dumps(value, indent=1).encode("utf-8"))


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _file_table(directory):
    table = {}
    for name in sorted(os.listdir(directory)):
        full = os.path.join(directory, name)
        if name == COMPLETE_FILE or not os.path.isfile(full):
            continue
        size = os.path.getsize(full)
        table[name] = {"size": size, "sha256": _sha256(full)} if size <= CHECKSUM_LIMIT else {
            "size": size}
    return table


def mark_complete(directory, converter_version):
    """Writes the completion marker of the cache entry `directory`: call it last, once every
    file of the entry is in place.

    Example:
    >>> save_preset(directory, backbone)
    >>> mark_complete(directory, CONVERTER_VERSION)
    """
    marker = {"converter_version": converter_version, "files": _file_table(directory)}
    write_json_atomically(os.path.join(directory, COMPLETE_FILE), marker)


def entry_problem(directory, converter_version):
    """What is wrong with the cache entry `directory`, or None when it is complete and intact.

    Example:
    >>> entry_problem(directory, CONVERTER_VERSION)
    'model.safetensors has 1048576 bytes, 2097152 expected'
    """
    try:
        with open(os.path.join(directory, COMPLETE_FILE)) as file:
            marker = json.load(file)
        files = dict(marker["files"])
    except FileNotFoundError:
        return f"no {COMPLETE_FILE}: its conversion did not finish"
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"{COMPLETE_FILE} is unreadable ({error})"
    if marker.get("converter_version") != converter_version:
        return (f"written by converter version {marker.get('converter_version')!r}, "
                f"this one is {converter_version!r}")
    for name, expected in files.items():
        full = os.path.join(directory, name)
        try:
            size = os.path.getsize(full)
        except OSError:
            return f"{name} is missing"
        if size != expected.get("size"):
            return f"{name} has {size} bytes, {expected.get('size')} expected"
        if "sha256" in expected and _sha256(full) != expected["sha256"]:
            return f"{name} does not match its recorded sha256"
    return None


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
    digest = _sha256(path)
    memo[path] = key + [digest]
    try:
        write_json_atomically(memo_path, memo)
    except OSError:  # a read-only cache only costs the hash next time
        pass
    return digest


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
