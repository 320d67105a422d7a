"""The files of a preset directory stay inside it: no symlink out, no `../` in an index.

A preset downloaded from the internet is data, and data must not make us read elsewhere on
the machine: a `model.safetensors` that links to `/home/me/.ssh/id_rsa`, or a shard index
naming `../../secret.safetensors`, is refused before anything is opened. A Hugging Face
cache snapshot is the one allowed exception to "inside": huggingface_hub stores each file
once under the repository's `blobs/` and links `snapshots/<revision>/<name>` to it, so a
snapshot's links may point anywhere inside its repository folder.

Example:
>>> check_links_inside("/path/to/preset")              # None, or ValueError naming the link
>>> shard_path("/path/to/preset", "model-00001-of-00002.safetensors", "index.json")
'/path/to/preset/model-00001-of-00002.safetensors'
"""

import os

_ADVICE = (
    "Copy the real file into the preset directory (or download the preset again); keras_gemma "
    "reads nothing outside the directory it is given."
)


def _allowed_root(directory):
    """The folder that links inside `directory` may point into (see the module docstring)."""
    real = os.path.realpath(directory)
    parent = os.path.dirname(real)
    if os.path.basename(parent) == "snapshots":
        return os.path.dirname(parent)  # huggingface_hub: models--org--repo/
    return real


def _inside(path, root):
    return os.path.commonpath([os.path.realpath(path), root]) == root


def check_links_inside(directory):
    """Raises ValueError for the first symlink under `directory` that resolves outside it.

    Walks without following links, so a linked folder is judged by its own target.
    """
    root = _allowed_root(directory)
    for folder, subfolders, files in os.walk(directory):
        for name in files + subfolders:
            path = os.path.join(folder, name)
            if os.path.islink(path) and not _inside(path, root):
                raise ValueError(
                    f"{path} is a symbolic link to {os.readlink(path)!r}, outside the preset "
                    f"directory {directory}. {_ADVICE}"
                )


def shard_path(directory, name, index_file):
    """`directory/name` for a file named by an index (`model.safetensors.index.json`,
    `model.weights.json`), refusing names that are not plain relative paths."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{index_file} names the weights file {name!r}, which is not a file "
                         "name. Download the preset again.")
    segments = name.replace("\\", "/").split("/")
    if os.path.isabs(name) or name.startswith("~") or ".." in segments:
        raise ValueError(
            f"{index_file} names the weights file {name!r}, a path that leaves the preset "
            f"directory {directory}. An index may name only files inside it: fix the entry "
            "or download the preset again."
        )
    path = os.path.join(directory, name)
    if not _inside(path, _allowed_root(directory)):
        raise ValueError(f"{index_file} names {name!r}, which resolves outside {directory}. "
                         f"{_ADVICE}")
    return path
