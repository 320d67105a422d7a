"""Writes that land whole or not at all: a temporary sibling, fsync, then one rename.

Every writer of a preset, an export or a file it contains goes through here, so a crash or
a full disk leaves the earlier state (or nothing), never half of a directory or a file.
"""

import contextlib
import os
import shutil
import tempfile


def _check_destination(path, marker, description):
    if not os.path.lexists(path):
        return
    if not os.path.isdir(path):
        raise ValueError(f"{path} exists and is not a directory.")
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


@contextlib.contextmanager
def atomic_directory(path, marker, description):
    """Yields a temporary sibling directory that replaces `path` only if the block succeeds.

    An earlier directory of the same kind at `path` (it holds `marker`) or an empty one is
    replaced; anything else is refused, naming `description` ("a preset", "an earlier
    export"). On failure nothing is left: neither the temporary directory nor a
    half-written `path`.

    Example:
    >>> with atomic_directory("./out", marker="config.json", description="a preset") as staging:
    ...     write_everything_into(staging)
    """
    path = os.path.abspath(os.fspath(path))
    _check_destination(path, marker, description)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.partial-", dir=parent)
    try:
        yield staging
        _fsync_tree(staging)
        if os.path.lexists(path):
            # Two renames: the old directory steps aside, the new one takes its name.
            retired = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=parent)
            os.rmdir(retired)
            os.rename(path, retired)
            os.rename(staging, path)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.rename(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path):
    """Yields a temporary sibling file name that replaces `path` only if the block succeeds.

    Example:
    >>> with atomic_file("model.gguf") as staging:
    ...     writer.write_to(staging)
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        raise ValueError(f"{path} is a directory; give the path of the file to write.")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.partial-", dir=parent)
    os.close(handle)
    try:
        yield staging
        with open(staging, "rb") as file:
            os.fsync(file.fileno())
        os.replace(staging, path)
    except BaseException:
        if os.path.exists(staging):
            os.remove(staging)
        raise


def write_file_atomically(path, data):
    """Writes the bytes `data` to `path` through `atomic_file`."""
    with atomic_file(path) as staging:
        with open(staging, "wb") as file:
            file.write(data)
