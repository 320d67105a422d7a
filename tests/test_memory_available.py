"""available_memory(): the smallest headroom of the cgroup limits and the host, read from a
fake /proc and /sys tree."""

import os

from keras_gemma.checkpoints.memory_available import available_memory

GB = 10**9


def _write(root, path, text):
    path = os.path.join(root, path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as file:
        file.write(text)


def fake_cgroup_v2(root, limit, used, inactive=0, parent_limit="max", parent_used=0,
                   host_available=64 * GB):
    """A cgroup v2 tree: the process in /app.slice/server, limits as given (bytes or "max")."""
    _write(root, "proc/self/cgroup", "0::/app.slice/server\n")
    _write(root, "proc/meminfo",
           f"MemTotal: 67108864 kB\nMemAvailable: {host_available // 1024} kB\n")
    _write(root, "sys/fs/cgroup/cgroup.controllers", "cpu memory\n")
    _write(root, "sys/fs/cgroup/app.slice/memory.max", f"{parent_limit}\n")
    _write(root, "sys/fs/cgroup/app.slice/memory.current", f"{parent_used}\n")
    _write(root, "sys/fs/cgroup/app.slice/server/memory.max", f"{limit}\n")
    _write(root, "sys/fs/cgroup/app.slice/server/memory.current", f"{used}\n")
    _write(root, "sys/fs/cgroup/app.slice/server/memory.stat",
           f"anon {used - inactive}\ninactive_file {inactive}\nactive_file 0\n")
    return str(root)


def test_cgroup_v2_limit_less_usage_and_reclaimable_cache(tmp_path):
    root = fake_cgroup_v2(tmp_path, limit=8 * GB, used=3 * GB, inactive=GB)
    headroom = available_memory(root)
    # 8 GB limit, 3 GB charged of which 1 GB is page cache the kernel reclaims first.
    assert headroom.bytes == 6 * GB
    assert "cgroup v2" in headroom.source and "app.slice/server/memory.max" in headroom.source
    assert "8.0 GB" in headroom.source


def test_a_parents_limit_binds_its_children(tmp_path):
    root = fake_cgroup_v2(tmp_path, limit="max", used=GB, parent_limit=5 * GB, parent_used=4 * GB)
    headroom = available_memory(root)
    assert headroom.bytes == GB and "app.slice/memory.max" in headroom.source


def test_the_host_answers_when_it_has_less_than_the_cgroup(tmp_path):
    root = fake_cgroup_v2(tmp_path, limit=32 * GB, used=GB, host_available=2 * GB)
    headroom = available_memory(root)
    assert headroom.bytes == 2 * GB and "MemAvailable" in headroom.source


def test_cgroup_v1_limit_and_its_no_limit_value(tmp_path):
    _write(tmp_path, "proc/self/cgroup", "4:memory:/docker/abc\n0::/\n")
    _write(tmp_path, "proc/meminfo", "MemAvailable: 16777216 kB\n")
    _write(tmp_path, "sys/fs/cgroup/memory/memory.limit_in_bytes", f"{4 * GB}\n")
    _write(tmp_path, "sys/fs/cgroup/memory/memory.usage_in_bytes", f"{3 * GB}\n")
    _write(tmp_path, "sys/fs/cgroup/memory/memory.stat", f"total_inactive_file {GB // 2}\n")
    headroom = available_memory(str(tmp_path))
    assert headroom.bytes == GB + GB // 2 and "cgroup v1" in headroom.source
    # Docker without --memory: "no limit" is 2**63 rounded to a page; the host answers.
    _write(tmp_path, "sys/fs/cgroup/memory/memory.limit_in_bytes", "9223372036854771712\n")
    headroom = available_memory(str(tmp_path))
    assert headroom.bytes == 16 * 2**30 and "MemAvailable" in headroom.source


def test_nothing_readable_is_none(tmp_path):
    assert available_memory(str(tmp_path)) is None
