"""How much more memory this process can take before the kernel kills it.

The host's free memory is not the answer inside a container: a cgroup limit (Docker's
`--memory`, Kubernetes' `resources.limits.memory`, a systemd slice) kills the process long
before the host runs out. `available_memory()` reads every source that applies and keeps the
smallest headroom:

- cgroup v2: `memory.max` minus what the cgroup uses, for the process's own cgroup and each
  ancestor that has a limit (a parent's limit binds its children);
- cgroup v1: `memory.limit_in_bytes` minus `memory.usage_in_bytes` of the memory controller;
- `/proc/meminfo`'s `MemAvailable`: what the host can give without swapping.

A cgroup's usage counts the page cache its processes have read (a checkpoint file just
read stays cached): the kernel reclaims the inactive part before killing anyone, so it is
subtracted from the usage (`inactive_file` of memory.stat), as `docker stats` does.
"""

import dataclasses
import os

# cgroup v1 writes "no limit" as a huge number (2**63 rounded down to a page).
_NO_LIMIT = 2**60


@dataclasses.dataclass(frozen=True)
class Headroom:
    """`bytes` more memory the process may use, and `source`: which limit says so."""

    bytes: int
    source: str


def _read(path):
    try:
        with open(path) as file:
            return file.read()
    except OSError:
        return None


def _read_int(path):
    text = _read(path)
    if text is None:
        return None
    text = text.strip()
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _stat(path, key):
    text = _read(path) or ""
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == key and value.strip().isdigit():
            return int(value)
    return 0


def _own_cgroups(root):
    """`{"v2": path inside the v2 hierarchy, "v1": path inside v1's memory controller}`
    from /proc/self/cgroup, for the entries that exist."""
    paths = {}
    for line in (_read(os.path.join(root, "proc/self/cgroup")) or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        number, controllers, path = parts
        if number == "0" and controllers == "":
            paths["v2"] = path
        elif "memory" in controllers.split(","):
            paths["v1"] = path
    return paths


def _directories(mount, path):
    """The cgroup directory of `path` under `mount` and each ancestor up to `mount`.

    Inside a container with its own cgroup namespace the mount is the container's cgroup
    and the path from /proc/self/cgroup may not exist under it: the mount itself is read.
    """
    directories = []
    parts = [part for part in path.split("/") if part and part not in (".", "..")]
    while parts:
        directory = os.path.join(mount, *parts)
        if os.path.isdir(directory):
            directories.append(directory)
        parts.pop()
    directories.append(mount)
    return directories


def _headrooms(directories, files, label):
    """The headroom of each cgroup directory that has a limit; `files` names its limit file,
    its usage file and the reclaimable page cache's key in memory.stat."""
    limit_file, usage_file, inactive_key = files
    headrooms = []
    for directory in directories:
        limit = _read_int(os.path.join(directory, limit_file))
        used = _read_int(os.path.join(directory, usage_file))
        if limit is None or used is None or limit >= _NO_LIMIT:
            continue
        used = max(0, used - _stat(os.path.join(directory, "memory.stat"), inactive_key))
        headrooms.append(Headroom(
            max(0, limit - used),
            f"{label} limit {os.path.join(directory, limit_file)} = {limit / 1e9:.1f} GB, "
            f"{used / 1e9:.1f} GB of it in use",
        ))
    return headrooms


def _cgroup_v2(root, path):
    for mount in ("sys/fs/cgroup", "sys/fs/cgroup/unified"):
        mount = os.path.join(root, mount)
        if os.path.exists(os.path.join(mount, "cgroup.controllers")):
            files = ("memory.max", "memory.current", "inactive_file")
            return _headrooms(_directories(mount, path), files, "cgroup v2")
    return []


def _cgroup_v1(root, path):
    mount = os.path.join(root, "sys/fs/cgroup/memory")
    if not os.path.isdir(mount):
        return []
    files = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
    return _headrooms(_directories(mount, path), files, "cgroup v1")


def _meminfo(root):
    path = os.path.join(root, "proc/meminfo")
    for line in (_read(path) or "").splitlines():
        name, _, value = line.partition(":")
        fields = value.split()
        if name == "MemAvailable" and fields and fields[0].isdigit():
            return [Headroom(int(fields[0]) * 1024, f"MemAvailable in {path}")]
    return []


def available_memory(root="/"):
    """The smallest headroom of this process's cgroup limits and the host's free memory,
    or None where none of them can be read (not Linux).

    `root` is where /proc and /sys are (tests point it at a fake tree).

    Example:
    >>> headroom = available_memory()
    >>> print(f"{headroom.bytes / 1e9:.1f} GB ({headroom.source})")
    8.0 GB (cgroup v2 limit /sys/fs/cgroup/memory.max = 16.0 GB, 8.0 GB of it in use)
    """
    paths = _own_cgroups(root)
    headrooms = _cgroup_v2(root, paths.get("v2", "/"))
    headrooms += _cgroup_v1(root, paths.get("v1", "/"))
    headrooms += _meminfo(root)
    if not headrooms:
        return None
    return min(headrooms, key=lambda headroom: headroom.bytes)
