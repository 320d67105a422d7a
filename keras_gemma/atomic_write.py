"""Writes that land whole or not at all: a temporary sibling, fsync, then one rename.

Every writer of a preset, an export, a cache entry or a file it contains goes through here,
so a crash, a kill or a full disk leaves the earlier state (or nothing), never half of a
directory or a file.

What a killed writer can leave, and what the next call does with it (POSIX):
- `.NAME.partial-XXXX` beside NAME: the temporary sibling directory it was filling (a file
  is staged inside one, under its own name). Removed by the next write of NAME (or by
  `recover_interrupted_write(NAME)`).
- `.NAME.old-XXXX` and no NAME: it was killed between its two renames (the old directory
  stepped aside, the new one not yet in). The next write, or a reader through
  `recover_interrupted_write`, puts the old directory back first (with a one-line warning),
  so the earlier state is never lost.
- `.NAME.old-XXXX` beside NAME: killed while deleting the replaced directory; removed.
A writer still running holds an flock on each sibling it owns, and the lock dies with its
process (SIGKILL included), so a sibling whose lock can be taken belongs to a dead writer and
a live writer's siblings are never touched. (A kill in the microseconds between creating a
sibling and locking it leaves an empty `.NAME.new-XXXX`, removed once a minute old.) Where
there is no `fcntl` (Windows) nothing is cleaned or put back: the leftovers are ignored.
"""

import contextlib
import errno
import os
import shutil
import tempfile
import time
import warnings

try:
    import fcntl
except ImportError:  # Windows: no flock; leftovers are ignored rather than cleaned
    fcntl = None

# A `.new-` sibling is unlocked for microseconds while its writer lives; one this old
# belongs to a writer killed in that moment.
_UNCLAIMED_AGE = 60
# Errors that mean "the disk (or the user's quota) is full".
_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def _check_destination(path, marker, description):
    if not os.path.lexists(path):
        return
    if not os.path.isdir(path):
        raise ValueError(f"{path} exists and is not a directory; give a directory path.")
    if os.listdir(path) and not os.path.exists(os.path.join(path, marker)):
        raise ValueError(
            f"{path} exists and is not {description}: refusing to overwrite it (it has no "
            f"{marker}). Choose a new or empty directory."
        )


def _fsync_tree(directory):
    for root, _, files in os.walk(directory):
        for name in files:
            with open(os.path.join(root, name), "rb") as file:
                os.fsync(file.fileno())


def _fsync_directory(directory):
    # Makes a rename inside `directory` durable; some systems cannot open a directory.
    try:
        handle = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def _hold(path):
    """An open descriptor of `path` holding an exclusive flock (None without fcntl)."""
    if fcntl is None:
        return None
    handle = os.open(path, os.O_RDONLY)
    fcntl.flock(handle, fcntl.LOCK_EX)
    return handle


def _release(handle):
    if handle is not None:
        os.close(handle)  # closing the last descriptor drops the flock


def _owner_is_gone(path):
    """Whether no live process holds the flock of the sibling `path` (taking it if so)."""
    try:
        handle = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(handle)


def _sibling(path, kind, suffix):
    parent, base = os.path.split(path)
    return os.path.join(parent, f".{base}.{kind}-{suffix}")


def _new_staging(path):
    """A new locked sibling directory `.NAME.partial-XXXX`: returns (lock, its path, XXXX).

    It is made as `.NAME.new-XXXX`, locked, and only then renamed, so that a cleaner never
    meets a `.partial-` sibling that its live writer has not locked yet. Files are staged
    inside such a directory too: the lock is on the directory, so a library that locks the
    file it writes (HDF5 does) is not in the way."""
    parent, base = os.path.split(path)
    fresh = tempfile.mkdtemp(prefix=f".{base}.new-", dir=parent)
    handle = _hold(fresh)
    suffix = os.path.basename(fresh)[len(f".{base}.new-"):]
    claimed = _sibling(path, "partial", suffix)
    os.rename(fresh, claimed)
    return handle, claimed, suffix


def _remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.remove(path)


def _recover(path):
    """Cleans the siblings dead writers left beside `path`; puts back a directory that a
    killed writer had stepped aside. Returns what it did, as sentences."""
    if fcntl is None:
        return []
    parent, base = os.path.split(path)
    done = []
    try:
        names = sorted(os.listdir(parent))
    except OSError:
        return done
    for name in names:
        sibling = os.path.join(parent, name)
        retired = name.startswith(f".{base}.old-")
        unclaimed = name.startswith(f".{base}.new-")
        if not (retired or unclaimed or name.startswith(f".{base}.partial-")):
            continue
        if unclaimed and time.time() - os.lstat(sibling).st_mtime < _UNCLAIMED_AGE:
            continue  # a live writer may be about to lock it
        if not _owner_is_gone(sibling):
            continue  # a writer that is still running owns it
        if retired and not os.path.lexists(path):
            os.rename(sibling, path)
            done.append(f"restored {path} from {name}, left by a write that was interrupted")
        else:
            _remove(sibling)
            done.append(f"removed {name}, left by a write that was interrupted")
    return done


def recover_interrupted_write(path):
    """Repairs what a killed writer left beside `path`; returns the repairs as sentences.

    A reader calls it when `path` is missing: a write killed between its two renames left
    the earlier version as `.NAME.old-XXXX`, and this puts it back. Harmless when there is
    nothing to repair (returns []), and a no-op without `fcntl`.

    Example:
    >>> recover_interrupted_write("./my_gemma")
    ['restored /home/me/my_gemma from .my_gemma.old-k2j4, left by a write that was interrupted']
    """
    path = os.path.abspath(os.fspath(path))
    if fcntl is None or not os.path.isdir(os.path.dirname(path)):
        return []
    try:
        repairs = _recover(path)
    except OSError:  # a read-only place: nothing a reader can repair
        return []
    _notify(repairs)
    return repairs


def _notify(repairs):
    # One line per directory put back; removing a dead writer's scraps needs no notice.
    for repair in repairs:
        if repair.startswith("restored"):
            warnings.warn(f"keras_gemma: {repair}.", stacklevel=4)


def _disk_full_error(error, path, kind):
    keeps = f"the earlier {kind} is as it was" if os.path.lexists(path) else (
        f"no {kind} was created")
    return OSError(
        error.errno,
        f"the disk holding {path} is full ({os.strerror(error.errno)}): {path} was not "
        f"written ({keeps}). Free space on that disk, or write somewhere with more room, "
        "and try again.",
    )


def _is_disk_full(error):
    return isinstance(error, OSError) and error.errno in _FULL


@contextlib.contextmanager
def atomic_directory(path, marker, description):
    """Yields a temporary sibling directory that replaces `path` only if the block succeeds.

    An earlier directory of the same kind at `path` (it holds `marker`) or an empty one is
    replaced; anything else is refused, naming `description` ("a preset", "an earlier
    export"). On failure nothing is left: neither the temporary directory nor a
    half-written `path`; a full disk raises an OSError that says so.

    Example:
    >>> with atomic_directory("./out", marker="config.json", description="a preset") as staging:
    ...     write_everything_into(staging)
    """
    path = os.path.abspath(os.fspath(path))
    parent, base = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    _notify(_recover(path))
    _check_destination(path, marker, description)
    staging_lock, staging, suffix = _new_staging(path)
    retired, retired_lock = None, None
    try:
        yield staging
        _fsync_tree(staging)
        if os.path.lexists(path):
            # Two renames: the old directory steps aside (locked first, so that no other
            # process takes it for a dead writer's), then the new one takes its name.
            retired = _sibling(path, "old", suffix)
            retired_lock = _hold(path)
            os.rename(path, retired)
        os.rename(staging, path)
        _fsync_directory(parent)
        if retired is not None:
            shutil.rmtree(retired, ignore_errors=True)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        if retired is not None and os.path.lexists(retired) and not os.path.lexists(path):
            os.rename(retired, path)  # interrupted between the renames: the old one back
        if _is_disk_full(error):
            kind = " ".join(w for w in description.split() if w not in ("a", "an", "earlier"))
            raise _disk_full_error(error, path, kind) from error
        raise
    finally:
        _release(staging_lock)
        _release(retired_lock)


@contextlib.contextmanager
def atomic_file(path):
    """Yields a temporary file name (in a sibling directory `.NAME.partial-XXXX`, with the
    same file name) that replaces `path` only if the block succeeds.

    Example:
    >>> with atomic_file("model.gguf") as staging:
    ...     writer.write_to(staging)
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        raise ValueError(f"{path} is a directory; give the path of the file to write.")
    parent, base = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    _notify(_recover(path))
    staging_lock, folder, _ = _new_staging(path)
    staging = os.path.join(folder, base)  # the same name: a writer may go by its suffix
    try:
        yield staging
        with open(staging, "rb") as file:
            os.fsync(file.fileno())
        os.replace(staging, path)
        _fsync_directory(parent)
    except BaseException as error:
        if _is_disk_full(error):
            raise _disk_full_error(error, path, "file") from error
        raise
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # empty after the rename
        _release(staging_lock)


def write_file_atomically(path, data):
    """Writes the bytes `data` to `path` through `atomic_file`.

    Example:
    >>> write_file_atomically("./my_gemma/config.json", b"{}")
    """
    with atomic_file(path) as staging:
        with open(staging, "wb") as file:
            file.write(data)
