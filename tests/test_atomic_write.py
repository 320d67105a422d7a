"""Crash safety of every writer, shown by killing it: SIGKILL at chosen file-system events
leaves the old complete state or nothing, and the next call succeeds; a full disk leaves the
old state and says so.

The writers run in forks of a warm server (tests/crash_child.py) that SIGKILL themselves just
before the k-th event (a file opened for writing, a write, fsync, mkdir, rename, replace,
rmtree, ...). After each kill the test compares what is on disk with a snapshot taken
before it. The states allowed: the old one byte for byte; the new one complete (a kill
after the last rename); or, for a directory killed between its two renames, nothing at the
path and the old one whole in `.NAME.old-XXXX`, which the next call (or a reader, through
`recover_interrupted_write`) puts back. The next call runs in the test process, on its
backend, and what it wrote is read back.
"""

import builtins
import errno
import hashlib
import os
import shutil
import time
import warnings

import numpy as np
import pytest

from conftest import BACKEND, to_numpy
from crash_child import CrashServer, WrappedFile, keras_job, plain_content

from keras_gemma.atomic_write import atomic_directory, recover_interrupted_write


# ----------------------------------------------------------------------------- helpers


def snapshot(path):
    """{relative path: sha256} of a file or directory; None when nothing is there."""
    if not os.path.lexists(path):
        return None
    if os.path.isfile(path):
        with open(path, "rb") as file:
            return {"": hashlib.sha256(file.read()).hexdigest()}
    files = {}
    for root, _, names in os.walk(path):
        for name in names:
            full = os.path.join(root, name)
            with open(full, "rb") as file:
                files[os.path.relpath(full, path)] = hashlib.sha256(file.read()).hexdigest()
    return files


def leftovers(path):
    parent, base = os.path.split(path)
    return sorted(n for n in os.listdir(parent) if n.startswith(f".{base}."))


def expected_plain(version):
    return {name: hashlib.sha256(data).hexdigest()
            for name, data in plain_content(version).items()}


def state_after_kill(path, before, new=None):
    """Which allowed state a kill left at `path` ("old", "new" or "window"); fails otherwise."""
    after = snapshot(path)
    if after == before:
        return "old"
    if after is None:
        retired = [n for n in leftovers(path) if ".old-" in n]
        assert before is not None and len(retired) == 1, (before, leftovers(path))
        assert snapshot(os.path.join(os.path.dirname(path), retired[0])) == before
        return "window"
    assert new is None or after == new, f"{path} holds neither the old nor the new state"
    return "new"


def kill_points(events, base, most):
    """Where to kill a writer of `base` (at most `most` points, in this order): just before
    its final rename, between its two renames, in the middle of its writes, and while it
    deletes the directory it replaced. Each point is [event, n]: the n-th such event."""

    def first(predicate, among=events):
        return next((k for k, event in enumerate(among, 1) if predicate(event)), None)

    finals = [k for k, event in enumerate(events, 1)
              if event in (f"rename .{base}.partial-*", f"replace {base}")]
    writes = [k for k, event in enumerate(events, 1) if event.startswith("write")]
    points = [finals[-1] if finals else None, first(lambda e: e == f"rename {base}"),
              writes[len(writes) // 2] if writes else None,
              first(lambda e: e == f"rmtree .{base}.old-*")]
    return [[events[k - 1], events[:k].count(events[k - 1])] for k in points
            if k is not None][:most]


def fill_disk(monkeypatch, module, room=200):
    """Files that `module` opens for writing hold `room` bytes between them, then fail as a
    full disk does (ENOSPC) in the middle of a write."""
    left = [room]

    def write(file, data):
        if len(data) > left[0]:
            file.write(data[: left[0]])
            left[0] = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        left[0] -= len(data)
        return file.write(data)

    def opening(file, mode="r", *args, **kwargs):
        opened = builtins.open(file, mode, *args, **kwargs)
        return WrappedFile(opened, write) if any(c in mode for c in "wax+") else opened

    monkeypatch.setattr(module, "open", opening, raising=False)


def assert_disk_full_error(error, path):
    message = str(error)
    assert error.errno == errno.ENOSPC and "is full" in message and str(path) in message
    assert "Free space" in message


# ----------------------------------------------------------------------------- the atomic layer


@pytest.fixture(scope="module")
def plain_server(tmp_path_factory):
    server = CrashServer("plain", log_path=str(tmp_path_factory.mktemp("log") / "plain.log"))
    yield server
    server.close()


def test_atomic_directory_survives_a_kill_at_every_event(plain_server, tmp_path):
    dest = str(tmp_path / "d")
    first = plain_server.run("directory", dest=dest, version=1)
    assert first["error"] is None
    states, tried = {}, 0
    # A first write killed at each event: nothing at the path, or the whole new directory.
    for k in range(1, len(first["events"]) + 1):
        fresh = str(tmp_path / f"first{k}")
        assert plain_server.run("directory", dest=fresh, version=2, kill_at=k)["killed"]
        assert snapshot(fresh) in (None, expected_plain(2))
        assert plain_server.run("directory", dest=fresh, version=1)["error"] is None
        assert snapshot(fresh) == expected_plain(1)
        tried += 1
    # Replacing an existing directory, killed at each event.
    plain_server.run("directory", dest=dest, version=3)
    events = plain_server.run("directory", dest=dest, version=4)["events"]
    assert any(e.startswith("rmtree .d.old-") for e in events)
    for k in range(1, len(events) + 1):
        before = snapshot(dest)
        reply = plain_server.run("directory", dest=dest, version=100 + k, kill_at=k)
        assert reply["killed"]
        state = state_after_kill(dest, before, expected_plain(100 + k))
        states[state] = states.get(state, 0) + 1
        if state == "window" and k % 2:  # a reader puts the old directory back
            with pytest.warns(UserWarning, match="restored"):
                assert recover_interrupted_write(dest)
            assert snapshot(dest) == before
        nxt = plain_server.run("directory", dest=dest, version=200 + k)
        assert nxt["error"] is None and snapshot(dest) == expected_plain(200 + k)
        assert all(".new-" in n for n in leftovers(dest)), leftovers(dest)
        tried += 1
    assert states.get("window") and states.get("old") and states.get("new"), states
    print(f"atomic_directory: {tried} kill points ({len(first['events'])} on a first "
          f"write, {len(events)} replacing one); states after the kill: {states}")


def test_atomic_file_and_json_survive_a_kill_at_every_event(plain_server, tmp_path):
    tried = 0
    for job, dest in (("file", str(tmp_path / "weights.bin")),
                      ("json", str(tmp_path / "memo.json"))):
        plain_server.run(job, dest=dest, version=1)
        events = plain_server.run(job, dest=dest, version=2)["events"]
        for k in range(1, len(events) + 1):
            before = snapshot(dest)
            assert plain_server.run(job, dest=dest, version=10 + k, kill_at=k)["killed"]
            assert state_after_kill(dest, before) in ("old", "new")
            assert plain_server.run(job, dest=dest, version=3)["error"] is None
            assert [n for n in leftovers(dest) if ".new-" not in n] == []
            tried += 1
    print(f"atomic_file: {tried} kill points")


def test_a_dead_writers_unclaimed_sibling_is_removed_once_stale(plain_server, tmp_path):
    """A kill between creating `.NAME.new-X` and locking it leaves it; a minute on, the next
    write removes it (a younger one may belong to a live writer)."""
    dest = str(tmp_path / "d")
    events = plain_server.run("directory", dest=dest, version=1)["events"]
    claim = events.index("rename .d.new-*") + 1
    assert plain_server.run("directory", dest=dest, version=2, kill_at=claim)["killed"]
    [unclaimed] = leftovers(dest)
    plain_server.run("directory", dest=dest, version=3)
    assert leftovers(dest) == [unclaimed]
    old = time.time() - 120
    os.utime(os.path.join(str(tmp_path), unclaimed), (old, old))
    plain_server.run("directory", dest=dest, version=4)
    assert leftovers(dest) == []


def test_a_live_writers_siblings_are_left_alone(tmp_path):
    """While a writer is inside its block, a reader's repair touches nothing of it."""
    dest = str(tmp_path / "d")
    with atomic_directory(dest, "a", "a test directory") as staging:
        open(os.path.join(staging, "a"), "w").close()
        assert recover_interrupted_write(dest) == []
        assert os.path.isdir(staging)
    assert os.listdir(dest) == ["a"] and leftovers(dest) == []


def test_a_full_disk_leaves_the_old_directory_and_says_so(tmp_path):
    dest = tmp_path / "d"
    with atomic_directory(dest, "a", "a test directory") as staging:
        (tmp_path / "x").write_text("")
        open(os.path.join(staging, "a"), "w").write("old")
    with pytest.raises(OSError) as raised:
        with atomic_directory(dest, "a", "a test directory") as staging:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert_disk_full_error(raised.value, dest)
    assert "earlier test directory is as it was" in str(raised.value)
    assert (dest / "a").read_text() == "old" and leftovers(str(dest)) == []


# ----------------------------------------------------------------------------- every writer

# job: (destination name, kill points tried per writer)
WRITERS = {
    "preset": ("preset", 4), "tokenizer": ("preset", 3), "lora": ("lora.safetensors", 2),
    "lora_h5": ("lora.h5", 1), "transformers": ("hf", 3), "gguf": ("model.gguf", 2),
    "convert": ("converted", 3), "cache": ("cache", 2),
}


@pytest.fixture(scope="module")
def keras_server(sentencepiece_proto, tmp_path_factory):
    log = str(tmp_path_factory.mktemp("log") / "keras.log")
    server = CrashServer("keras", sentencepiece_proto, log_path=log)
    yield server
    server.close()


@pytest.fixture(scope="module")
def local_models(sentencepiece_proto):
    """The same tiny models in the test process, on its backend, for the next calls."""
    from crash_child import _KerasModels

    return _KerasModels(sentencepiece_proto)


@pytest.fixture(scope="module")
def gguf_source(keras_server, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("gguf") / "tiny.gguf")
    assert keras_server.run("gguf", dest=path, version=7)["error"] is None
    return path


def _request(job, tmp_path, tiny_preset, gguf_source):
    dest = str(tmp_path / WRITERS[job][0])
    request = {"job": "lora" if job == "lora_h5" else job, "dest": dest}
    if job == "convert":
        request["source"] = tiny_preset
    if job == "cache":
        request["source"] = gguf_source
    return request


def _entry(request):
    """The path whose state a job changes (a cache entry is a directory inside the cache)."""
    if request["job"] != "cache":
        return request["dest"]
    with open(request["source"], "rb") as file:
        digest = hashlib.sha256(file.read()).hexdigest()
    return os.path.join(request["dest"], "gguf", digest)


def _read_back(request, models):
    """Reads what the next call wrote, on this backend, and compares it with the model."""
    import keras_gemma
    from keras_gemma.checkpoints import gguf

    job, dest = request["job"], request["dest"]
    if job in ("preset", "transformers"):
        lm = keras_gemma.GemmaCausalLM.from_preset(dest)
        expected = models.lm.backbone.token_embedding.embeddings
        actual = lm.backbone.token_embedding.embeddings
        np.testing.assert_allclose(to_numpy(actual), to_numpy(expected), atol=1e-6)
    elif job in ("tokenizer", "convert"):
        keras_gemma.GemmaCausalLM.from_preset(dest)
    elif job == "lora":
        fresh = keras_gemma.GemmaBackbone(**models.lora.get_config())
        fresh.enable_lora(rank=2)
        fresh.load_lora_weights(dest)
    elif job == "gguf":
        assert gguf.open_gguf(dest).tensors
    else:
        from keras_gemma.checkpoints.conversion_cache import entry_problem

        assert entry_problem(_entry(request), gguf.CONVERTER_VERSION) is None


def _next_call(request, models, monkeypatch):
    if request["job"] == "cache":
        monkeypatch.setenv("KERAS_GEMMA_CACHE", request["dest"])
    if request["job"] == "convert":
        from keras_gemma.cli import main

        assert main(["convert", request["source"], request["dest"]]) == 0
    else:
        keras_job(models, request)


@pytest.mark.parametrize("job", sorted(WRITERS))
def test_writer_killed_leaves_old_state_and_next_call_succeeds(
        job, keras_server, local_models, tiny_preset, gguf_source, tmp_path, monkeypatch):
    request = _request(job, tmp_path, tiny_preset, gguf_source)
    if job == "tokenizer":  # the tokenizer is added to an existing preset
        assert keras_server.run("preset", dest=request["dest"], version=1)["error"] is None
    entry = _entry(request)
    if job != "cache":  # an old state to replace (a cache entry is only written when missing)
        assert keras_server.run(version=1, **request)["error"] is None
    events = keras_server.run(version=2, **request)["events"]
    points = kill_points(events, os.path.basename(entry), WRITERS[job][1])
    if job == "cache":  # and the moment before the completion marker
        points = points[:-1] + [[next(
            e for e in events if e.startswith("mkdir .conversion_complete")), 1]]
    states = {}
    for number, k in enumerate(points):
        before = snapshot(entry)
        if job == "cache":
            shutil.rmtree(entry)  # a converted entry is reused: only a conversion writes
            before = None
        reply = keras_server.run(version=10 + number, kill_at=k, **request)
        assert reply["killed"], (k, reply)
        state = state_after_kill(entry, before)
        states[k[0]] = state
        if state == "window" and job == "preset":  # a reader puts the old preset back
            import keras_gemma

            with pytest.warns(UserWarning, match="restored"):
                keras_gemma.GemmaCausalLM.from_preset(request["dest"])
            assert snapshot(entry) == before
        with warnings.catch_warnings(record=True) as notices:
            warnings.simplefilter("always")
            _next_call(request, local_models, monkeypatch)
        messages = [str(w.message) for w in notices]
        if job == "cache" and state == "new":  # whole, but without the completion marker
            assert any("unusable" in m and "did not finish" in m for m in messages), messages
        assert [n for n in leftovers(entry) if ".new-" not in n] == []
    _read_back(request, local_models)  # what the last next call wrote, on this backend
    print(f"{job}: {len(points)} kill points of {len(events)} events: {states}")


# Where each writer's bytes go through Python's `open` (the module whose `open` fills up).
FULL_DISK_MODULES = {
    "preset": "keras_gemma.checkpoints.safetensors_io",
    "tokenizer": "keras_gemma.checkpoints.preset_parts",
    "lora": "keras_gemma.checkpoints.safetensors_io",
    "transformers": "keras_gemma.checkpoints.safetensors_io",
    "gguf": "gguf.gguf_writer",
    "convert": "keras_gemma.checkpoints.safetensors_io",
    "cache": "keras_gemma.checkpoints.safetensors_io",
}


@pytest.mark.parametrize("job", sorted(FULL_DISK_MODULES))
def test_a_full_disk_leaves_the_old_state_and_a_clear_error(
        job, local_models, tiny_preset, tmp_path, monkeypatch, capsys):
    import importlib

    gguf_source = str(tmp_path / "source.gguf")
    if job == "cache":
        keras_job(local_models, {"job": "gguf", "dest": gguf_source})
    request = _request(job, tmp_path, tiny_preset, gguf_source)
    if job == "tokenizer":
        keras_job(local_models, {"job": "preset", "dest": request["dest"]})
    if job != "cache":  # an old state to keep (a cache entry is only written when missing)
        _next_call(request, local_models, monkeypatch)
    entry = _entry(request)
    before = snapshot(entry)
    fill_disk(monkeypatch, importlib.import_module(FULL_DISK_MODULES[job]))
    if job == "convert":
        from keras_gemma.cli import main

        assert main(["convert", request["source"], request["dest"]]) == 1
        message = capsys.readouterr().err
        assert "is full" in message and request["dest"] in message and "Free space" in message
    else:
        with pytest.raises(OSError) as raised:
            _next_call(request, local_models, monkeypatch)
        if job == "cache":  # the cache adds where to put it instead
            assert "KERAS_GEMMA_CACHE" in str(raised.value) and "is full" in str(raised.value)
        else:
            assert_disk_full_error(raised.value, os.path.abspath(request["dest"]))
    assert snapshot(entry) == before
    assert leftovers(entry) == []


@pytest.mark.skipif(BACKEND != "tensorflow", reason=(
    "export_saved_model writes under TensorFlow whatever the backend (JAX and torch models "
    "go through a TensorFlow subprocess running this same code); CI time"))
def test_saved_model_export_killed_leaves_the_old_export_and_the_next_one_succeeds(
        sentencepiece_proto, tmp_path):
    """An export replacing an earlier one, killed at four points: in TensorFlow's own write,
    among the fsyncs, between the two renames, and before the old export is deleted. Each
    export traces the generate loop (the costly part), so the points are named here rather
    than found by a first export. After every kill the next export must succeed and load."""
    import tensorflow as tf
    import tensorflow_text  # noqa: F401  (registers the tokenizer's op for loading)

    dest = str(tmp_path / "served")
    os.makedirs(os.path.join(dest, "variables"))  # an earlier export: what the call replaces
    for name, data in (("saved_model.pb", b"old graph"), ("variables/variables.index", b"i")):
        with open(os.path.join(dest, name), "wb") as file:
            file.write(data)
    # Events of an export replacing another (see crash_child): ..., "saved_model.save",
    # "tf_write saved_model.pb", fsyncs, "rename served" (the old one steps aside),
    # "rename .served.partial-*" (the new one in), "rmtree .served.old-*", ...
    points = [["tf_write saved_model.pb", 1], ["fsync", 3], ["rename .served.partial-*", 1],
              ["rmtree .served.old-*", 1]]
    server = CrashServer("tensorflow", sentencepiece_proto,
                         log_path=str(tmp_path / "tensorflow.log"))
    states = {}
    try:
        for number, point in enumerate(points):
            before = snapshot(dest)
            killed = server.run("saved_model", dest=dest, kill_at=point)
            assert killed["killed"], (point, killed)
            state = state_after_kill(dest, before)
            states[point[0]] = state
            if state == "window":  # a reader puts the earlier export back
                retired = [n for n in leftovers(dest) if ".old-" in n]
                with pytest.warns(UserWarning, match="restored"):
                    assert recover_interrupted_write(dest)
                assert snapshot(dest) == before
                assert not os.path.exists(os.path.join(str(tmp_path), retired[0]))
            if number % 2 or number == len(points) - 1:  # the next call, on every other kill
                reply = server.run("saved_model", dest=dest)
                assert reply["error"] is None and not reply["killed"], reply
                assert leftovers(dest) == [] and snapshot(dest) != before
    finally:
        server.close()
    assert states == {"tf_write saved_model.pb": "old", "fsync": "old",
                      "rename .served.partial-*": "window",
                      "rmtree .served.old-*": "new"}, states
    served = tf.saved_model.load(dest)
    assert "generate" in served.signatures
    print(f"saved_model: {len(points)} kill points {states}; the next export loads")
