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


def test_a_damaged_cache_entry_is_rebuilt_with_a_notice(sentencepiece_proto, tmp_path,
                                                        monkeypatch):
    """An entry whose files do not match its completion marker (cut short, altered) is never
    used: it is converted again, with a one-line warning."""
    import warnings

    import export_models
    from keras_gemma.checkpoints import gguf
    from keras_gemma.checkpoints.conversion_cache import entry_problem
    from keras_gemma.export.gguf_export import export_to_gguf

    monkeypatch.setenv("KERAS_GEMMA_CACHE", str(tmp_path / "cache"))
    source = str(tmp_path / "tiny.gguf")
    export_to_gguf(export_models.causal_lm("gemma", sentencepiece_proto), source, dtype="f16")
    entry = gguf.convert(source)
    intact = {name: open(os.path.join(entry, name), "rb").read() for name in os.listdir(entry)}

    def cut(name):
        with open(os.path.join(entry, name), "r+b") as file:
            file.truncate(len(intact[name]) // 2)

    def alter(name):
        data = bytearray(intact[name])
        data[len(data) // 2] ^= 1
        open(os.path.join(entry, name), "wb").write(bytes(data))

    # Cut short: found by its size, converted again with a notice. (An entry without its
    # marker, as a kill leaves it: tests/test_atomic_write.py.)
    cut("model.safetensors")
    assert "bytes" in entry_problem(entry, gguf.CONVERTER_VERSION)
    with warnings.catch_warnings(record=True) as notices:
        warnings.simplefilter("always")
        assert gguf.convert(source) == entry
    [notice] = [str(w.message) for w in notices if "cached conversion" in str(w.message)]
    assert "unusable" in notice and "model.safetensors has" in notice
    assert "converting it again" in notice
    assert entry_problem(entry, gguf.CONVERTER_VERSION) is None
    assert open(os.path.join(entry, "model.safetensors"), "rb").read() == intact[
        "model.safetensors"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an intact entry: no notice, no conversion
        assert gguf.convert(source) == entry
    # Altered but the same size: found by its checksum (the same rebuild follows).
    alter("tokenizer.model")
    assert "tokenizer.model does not match its recorded sha256" in entry_problem(
        entry, gguf.CONVERTER_VERSION)
