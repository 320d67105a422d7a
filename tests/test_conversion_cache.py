"""The conversion cache: its root, remembered file hashes, and writes that never show half a file."""

import hashlib
import json
import os

from keras_gemma.checkpoints.conversion_cache import cache_root
from keras_gemma.checkpoints.conversion_cache import file_sha256
from keras_gemma.checkpoints.conversion_cache import write_json_atomically


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("KERAS_GEMMA_CACHE", str(tmp_path / "mine"))
    assert cache_root() == str(tmp_path / "mine")
    monkeypatch.delenv("KERAS_GEMMA_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == os.path.join(str(tmp_path / "xdg"), "keras_gemma")


def test_file_sha256_is_remembered_until_the_file_changes(monkeypatch, tmp_path):
    monkeypatch.setenv("KERAS_GEMMA_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "weights.gguf"
    path.write_bytes(b"first")
    assert file_sha256(path) == hashlib.sha256(b"first").hexdigest()
    memo = tmp_path / "cache" / "gguf" / "sha256.json"
    assert str(path) in json.loads(memo.read_text())
    path.write_bytes(b"second, longer")  # a new size: the remembered hash no longer applies
    assert file_sha256(path) == hashlib.sha256(b"second, longer").hexdigest()


def test_write_json_atomically_leaves_only_the_file(tmp_path):
    target = tmp_path / "deep" / "value.json"
    write_json_atomically(str(target), {"a": 1})
    write_json_atomically(str(target), {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2}
    assert os.listdir(target.parent) == ["value.json"]


def test_exclusive_lets_one_converter_in_at_a_time(tmp_path):
    """Two loaders of the same GGUF file: the second waits for the first's conversion."""
    import sys
    import threading

    from keras_gemma.checkpoints.conversion_cache import exclusive

    if sys.platform == "win32":
        return  # no lock there (see `exclusive`)
    path = str(tmp_path / "cache" / "converted")
    order, inside, release = [], threading.Event(), threading.Event()

    def first():
        with exclusive(path):
            order.append("first in")
            inside.set()
            release.wait(10)
            order.append("first out")

    def second():
        with exclusive(path):
            order.append("second in")

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    threads[0].start()
    assert inside.wait(10)
    threads[1].start()
    threads[1].join(0.5)
    assert threads[1].is_alive()  # waiting for the lock
    release.set()
    for thread in threads:
        thread.join(10)
    assert order == ["first in", "first out", "second in"]
