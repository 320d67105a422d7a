"""Kills writers in the middle, for tests/test_atomic_write.py: a fork server and its client.

`CrashServer(mode)` starts `python tests/crash_child.py MODE` once; each `run(job, ...)` forks
that process, and the fork runs one writer with the file system's events counted (each file
opened for writing, each `write` to it, fsync, mkdir, link, rename, replace, remove, rmtree,
and TensorFlow's SavedModel steps) and SIGKILLs itself just before event `kill_at`. A killed
process cannot go on, so one process per kill point is unavoidable; forking a warm process
makes each one cost milliseconds instead of a Python and Keras start.

Modes:
- "plain": the atomic layer alone (keras_gemma.atomic_write, checkpoints.conversion_cache)
  without importing keras: the `keras_gemma` package's `__init__` is bypassed.
- "keras": every keras_gemma writer, under Keras' numpy backend, which starts no threads, so
  the server may fork after building its tiny models (JAX, TensorFlow and torch start
  thread pools, and a fork after them can deadlock). What these tests check happens in the
  writers' file handling, the same code on every backend; the test process then makes the
  next call and reads the result back on its own backend.
- "tensorflow": the SavedModel export, which only ever runs under TensorFlow (on JAX and
  torch, `export_saved_model` runs this same code in a TensorFlow subprocess). TensorFlow
  is imported but not started before forking; each fork builds its model.
"""

import builtins
import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import types
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TEMPORARY = re.compile(r"\.(partial|old|new)-[^/]*")


# ----------------------------------------------------------------------------- the client


class CrashServer:
    """The test's side: starts the server and runs jobs in it.

    Example:
    >>> server = CrashServer("plain")
    >>> server.run("directory", dest="/tmp/x", version=2, kill_at=5)["killed"]
    True
    """

    def __init__(self, mode, sentencepiece_model="", log_path=os.devnull):
        environment = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [ROOT, os.path.join(ROOT, "tests"), os.environ.get("PYTHONPATH", "")]))
        self._log = open(log_path, "w")
        self.process = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), mode, sentencepiece_model],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True,
            env=environment)
        ready = self.process.stdout.readline()
        if ready.strip() != "ready":
            raise RuntimeError(f"the crash server did not start (see {log_path}).")

    def run(self, job, **request):
        """Runs `job` in a fork; returns {"killed", "events", "error", "result"}."""
        self.process.stdin.write(json.dumps({"job": job, **request}) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("the crash server died.")
        return json.loads(line)

    def close(self):
        self.process.stdin.close()
        self.process.wait(timeout=60)
        self._log.close()


# ----------------------------------------------------------------------------- the server

_EVENTS = []
_KILL_AT = [None]


def _event(kind, path=""):
    name = "" if isinstance(path, int) else os.path.basename(os.fspath(path))
    name = _TEMPORARY.sub(lambda m: f".{m.group(1)}-*", name)
    _EVENTS.append(f"{kind} {name}".strip())
    # `kill_at`: the event's number (1-based), its text (its first occurrence), or [text, n]
    # (its n-th occurrence), which stays put when a run has more or fewer other events.
    kill_at = _KILL_AT[0]
    if isinstance(kill_at, list):
        kill_at = _EVENTS[-1] == kill_at[0] and _EVENTS.count(kill_at[0]) == kill_at[1]
    if kill_at in (len(_EVENTS), _EVENTS[-1], True):
        os.kill(os.getpid(), signal.SIGKILL)


class WrappedFile:
    """A file whose `write(data)` is `write(file, data)`: counted here, filled up in a test.

    Example:
    >>> WrappedFile(open("x", "wb"), lambda file, data: file.write(data[:1])).write(b"ab")
    1
    """

    def __init__(self, file, write):
        self._file, self._write = file, write

    def write(self, data):
        return self._write(self._file, data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._file.close()

    def __getattr__(self, name):
        return getattr(self._file, name)


def _counted_write(path):
    def write(file, data):
        _event("write", path)
        return file.write(data)

    return write


def _patched(function, kind, counted_argument=0):
    def counted(*args, **kwargs):
        _event(kind, args[counted_argument] if args else "")
        return function(*args, **kwargs)

    return counted


def _count_events():
    real_open = builtins.open

    def counted_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+"):
            _event("open", file)
            return WrappedFile(real_open(file, mode, *args, **kwargs), _counted_write(file))
        return real_open(file, mode, *args, **kwargs)

    builtins.open = counted_open
    for name in ("rename", "replace", "link", "mkdir", "remove", "unlink"):
        setattr(os, name, _patched(getattr(os, name), name))
    os.fsync = _patched(os.fsync, "fsync")
    shutil.rmtree = _patched(shutil.rmtree, "rmtree")


def _import_without_keras():
    """Makes `keras_gemma.atomic_write` and `keras_gemma.checkpoints.conversion_cache`
    importable without running the package's __init__ (which imports keras)."""
    for name, folder in (("keras_gemma", "keras_gemma"),
                         ("keras_gemma.checkpoints", "keras_gemma/checkpoints")):
        package = types.ModuleType(name)
        package.__path__ = [os.path.join(ROOT, folder)]
        sys.modules[name] = package


def plain_content(version, files=3, chunks=2):
    """What the plain jobs write for `version`: {name: bytes}, a pure function of it."""
    return {f"part{i}.bin": b"".join(f"v{version} f{i} c{c};".encode() * 64
                                     for c in range(chunks)) for i in range(files)}


def _plain_job(request):
    from keras_gemma import atomic_write
    from keras_gemma.checkpoints import conversion_cache

    dest, content = request["dest"], plain_content(request["version"])
    if request["job"] == "directory":
        with atomic_write.atomic_directory(dest, "part0.bin", "a test directory") as staging:
            for name, data in content.items():
                with open(os.path.join(staging, name), "wb") as file:
                    half = len(data) // 2
                    file.write(data[:half])
                    file.write(data[half:])
    elif request["job"] == "file":
        data = b"".join(content.values())
        with atomic_write.atomic_file(dest) as staging:
            with open(staging, "wb") as file:
                for start in range(0, len(data), len(data) // 4):
                    file.write(data[start:start + len(data) // 4])
    elif request["job"] == "json":
        conversion_cache.write_json_atomically(dest, {"version": request["version"]})
    else:
        raise ValueError(f"unknown job {request['job']!r}")


class _KerasModels:
    """The tiny models the keras jobs write, built once before any fork."""

    def __init__(self, sentencepiece_model):
        for name in ("keras_gemma.export.gguf_export", "keras_gemma.cli",
                     "keras_gemma.export.transformers_export", "keras_gemma.checkpoints.gguf"):
            importlib.import_module(name)
        from conftest import tiny_config

        import keras_gemma

        tokenizer = keras_gemma.GemmaTokenizer(proto=sentencepiece_model)
        preprocessor = keras_gemma.GemmaCausalLMPreprocessor(tokenizer, sequence_length=16)
        backbone = keras_gemma.GemmaBackbone(**tiny_config(vocabulary_size=1000),
                                            dtype="float32")
        self.lm = keras_gemma.GemmaCausalLM(backbone, preprocessor)
        self.lora = keras_gemma.GemmaBackbone(**tiny_config(vocabulary_size=1000),
                                             dtype="float32")
        self.lora.enable_lora(rank=2)

    def set_version(self, version):
        import numpy as np

        rng = np.random.default_rng(version)
        for model in (self.lm, self.lora):
            for variable in model.weights:
                variable.assign(rng.normal(0, 0.1, variable.shape).astype(variable.dtype))


def keras_job(models, request):
    """Runs one keras_gemma writer (also called in the test process, for the next call)."""
    job, dest = request["job"], request["dest"]
    if job == "preset":
        return models.lm.save_to_preset(dest)
    if job == "tokenizer":
        return models.lm.preprocessor.tokenizer.save_to_preset(dest)
    if job == "lora":
        return models.lora.save_lora_weights(dest)
    if job == "transformers":
        from keras_gemma.export.transformers_export import export_to_transformers

        return export_to_transformers(models.lm, dest)
    if job == "gguf":
        from keras_gemma.export.gguf_export import export_to_gguf

        return export_to_gguf(models.lm, dest, dtype="f16")
    if job == "convert":
        from keras_gemma.cli import main

        return main(["convert", request["source"], dest])
    if job == "cache":
        from keras_gemma.checkpoints import gguf

        os.environ["KERAS_GEMMA_CACHE"] = dest
        return gguf.convert(request["source"])
    if job == "saved_model":
        return _export_saved_model(request)
    raise ValueError(f"unknown job {job!r}")


def _export_saved_model(request):
    import tensorflow as tf
    from conftest import tiny_config
    from tensorflow.python.lib.io import file_io

    import keras_gemma

    # TensorFlow writes the variables in C++; its Python steps around them are the events.
    tf.saved_model.save = _patched(tf.saved_model.save, "saved_model.save", 1)
    file_io.atomic_write_string_to_file = _patched(
        file_io.atomic_write_string_to_file, "tf_write")
    tokenizer = keras_gemma.GemmaTokenizer(proto=request["sentencepiece_model"])
    preprocessor = keras_gemma.GemmaCausalLMPreprocessor(tokenizer, sequence_length=8)
    backbone = keras_gemma.GemmaBackbone(**tiny_config(vocabulary_size=1000, num_layers=1),
                                         dtype="float32")
    lm = keras_gemma.GemmaCausalLM(backbone, preprocessor)
    return keras_gemma.export_saved_model(lm, request["dest"], max_length=4)


def _child(mode, models, request):
    os.dup2(2, 1)  # what the writer prints must not mix with the replies
    if models is not None:
        models.set_version(request.get("version", 0))
    _KILL_AT[0] = request.get("kill_at")
    _count_events()
    outcome = {"events": _EVENTS, "error": None, "result": None}
    with warnings.catch_warnings(record=True) as notices:
        warnings.simplefilter("always")
        try:
            outcome["result"] = (_plain_job(request) if mode == "plain"
                                 else keras_job(models, request))
        except BaseException as error:  # reported to the test, which decides
            outcome["error"] = f"{type(error).__name__}: {error}"
    outcome["warnings"] = [str(notice.message) for notice in notices]
    return outcome


def serve(mode, sentencepiece_model):
    if mode == "plain":
        _import_without_keras()
        models = None
    elif mode == "keras":
        os.environ["KERAS_BACKEND"] = "numpy"
        # Keras' serialization asks whether tensorflow is installed (importing it, seconds)
        # only to recognize TensorFlow objects, which these models do not hold.
        sys.modules["tensorflow"] = None
        models = _KerasModels(sentencepiece_model)
    else:
        os.environ["KERAS_BACKEND"] = "tensorflow"
        for name in ("tensorflow", "keras_gemma", "tensorflow_text"):
            importlib.import_module(name)  # imported, not started: forks stay safe
        models = None
    replies = sys.stdout
    print("ready", file=replies, flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if mode == "tensorflow":
            request["sentencepiece_model"] = sentencepiece_model
        reading, writing = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(reading)
            outcome = _child("plain" if mode == "plain" else "keras", models, request)
            with os.fdopen(writing, "w") as pipe:
                pipe.write(json.dumps(outcome, default=str))
            os._exit(0)
        os.close(writing)
        with os.fdopen(reading) as pipe:
            data = pipe.read()
        _, status = os.waitpid(pid, 0)
        reply = json.loads(data) if data else {"events": None, "error": None, "result": None}
        reply["killed"] = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        print(json.dumps(reply), file=replies, flush=True)


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "")
