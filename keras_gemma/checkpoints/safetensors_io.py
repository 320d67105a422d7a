"""Reading and writing safetensors files with numpy alone.

We parse the format ourselves (an 8-byte little-endian header length, a JSON header, then
raw little-endian tensors) so that tensors are memory-mapped rather than copied, bfloat16
comes back as an `ml_dtypes` array without torch, and a truncated or corrupt file is
detected before any tensor is used.
"""

import json
import math
import mmap
import os
import struct

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
_MAX_HEADER_BYTES = 100 * 1024 * 1024


class SafetensorsError(ValueError):
    """A safetensors file is truncated, corrupt, or holds a dtype we cannot read."""


_FIX = "Download or convert the file again."


def _corrupt(path, name, problem):
    return SafetensorsError(
        f"{path} is truncated or corrupt: tensor {name!r} {problem}. {_FIX}"
    )


def _checked_entry(path, name, entry, data_size):
    """(dtype, shape, begin, end) of one header entry, every field checked against the file."""
    if not isinstance(entry, dict):
        raise _corrupt(path, name, f"has the header entry {entry!r} instead of an object")
    dtype = _DTYPES.get(entry.get("dtype"))
    if dtype is None:
        raise SafetensorsError(
            f"{path}: tensor {name!r} has dtype {entry.get('dtype')!r}, which "
            f"keras_gemma cannot read (supported: {sorted(_DTYPES)})."
        )
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise _corrupt(path, name, f"has shape {shape!r}, not a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(_is_count(o) for o in offsets) or offsets[0] > offsets[1]):
        raise _corrupt(path, name, f"has data_offsets {offsets!r}, not [begin, end] with "
                       "0 <= begin <= end")
    begin, end = offsets
    expected = math.prod(shape) * dtype.itemsize  # Python integers: an overflow cannot hide
    if end - begin != expected:
        raise _corrupt(path, name, f"of dtype {entry['dtype']} and shape {tuple(shape)} needs "
                       f"{expected} bytes, but its data_offsets {offsets} span {end - begin}")
    if end > data_size:
        raise _corrupt(path, name, f"of shape {tuple(shape)} needs bytes {begin}..{end} of "
                       f"data, the file holds {data_size}")
    return dtype, tuple(shape), begin, end


def _is_count(value):
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_no_overlap(path, entries):
    """Refuses two tensors whose bytes overlap (writing one would change the other)."""
    spans = sorted((begin, end, name) for name, (_, _, begin, end) in entries.items()
                   if end > begin)
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
        if begin < end:
            raise _corrupt(path, second, f"overlaps tensor {first!r} (its data begins at "
                           f"byte {begin}, before {first!r} ends at {end})")



class SafetensorsFile:
    """A safetensors file, memory-mapped: tensors are read when used and released after.

    `release(name)` drops a tensor's pages from this process's resident memory, so loading a
    checkpoint tensor by tensor never holds the whole file and the whole model at once.

    Example:
    >>> with SafetensorsFile("model.safetensors") as weights:
    ...     norm = np.array(weights["model.norm.weight"])
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as file:
            prefix = file.read(8)
            if len(prefix) < 8:
                raise SafetensorsError(
                    f"{self.path} is not a safetensors file: it has {size} bytes."
                )
            (header_length,) = struct.unpack("<Q", prefix)
            if header_length > min(_MAX_HEADER_BYTES, size - 8):
                raise SafetensorsError(
                    f"{self.path} is not a safetensors file or is truncated: its header "
                    f"claims {header_length} bytes but the file has {size} (and a header is "
                    f"at most {_MAX_HEADER_BYTES}). {_FIX}"
                )
            try:
                header = json.loads(file.read(header_length))
            except (UnicodeDecodeError, json.JSONDecodeError) as error:
                raise SafetensorsError(
                    f"{self.path} has a corrupt safetensors header (not JSON: {error}). {_FIX}"
                ) from None
            if not isinstance(header, dict):
                raise SafetensorsError(
                    f"{self.path} has a corrupt safetensors header: a JSON "
                    f"{type(header).__name__} instead of an object of tensors. {_FIX}"
                )
            self.metadata = header.pop("__metadata__", None) or {}
            self._data_start = 8 + header_length
            data_size = size - self._data_start
            self._entries = {
                name: _checked_entry(self.path, name, entry, data_size)
                for name, entry in header.items()
            }
            _check_no_overlap(self.path, self._entries)
            self._map = (
                mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) if size > 0 else None
            )

    def keys(self):
        return self._entries.keys()

    def __contains__(self, name):
        return name in self._entries

    def __iter__(self):
        return iter(self._entries)

    def __len__(self):
        return len(self._entries)

    def __getitem__(self, name):
        dtype, shape, begin, end = self._entries[name]
        count = (end - begin) // dtype.itemsize
        return np.frombuffer(
            self._map, dtype=dtype, count=count, offset=self._data_start + begin
        ).reshape(shape)

    def read(self, name, dtype=None, chunk_bytes=64 * 1024 * 1024):
        """An owned, writable copy of tensor `name` (cast to `dtype`), read in chunks.

        Each chunk's file pages are dropped from resident memory as soon as they are copied,
        so reading a 1 GB tensor costs 1 GB plus one chunk, not 2 GB.
        """
        source = self[name]
        target = np.empty(source.shape, dtype=dtype or source.dtype)
        flat_source = source.reshape(-1)
        flat_target = target.reshape(-1)
        step = max(1, chunk_bytes // max(1, source.dtype.itemsize))
        _, _, begin, _ = self._entries[name]
        for start in range(0, flat_source.size, step):
            stop = min(flat_source.size, start + step)
            flat_target[start:stop] = flat_source[start:stop]
            offset = self._data_start + begin + start * source.dtype.itemsize
            self._release_range(offset, (stop - start) * source.dtype.itemsize)
        return target

    def read_rows(self, name, start=0, stop=None, dtype=None):
        """Rows [start, stop) of tensor `name` along its first axis, as an owned copy (cast to
        `dtype`); their file pages are dropped from resident memory as `read` does."""
        source = self[name]
        stop = source.shape[0] if stop is None else min(stop, source.shape[0])
        target = np.array(source[start:stop], dtype=dtype or source.dtype)
        row_bytes = source.dtype.itemsize * int(np.prod(source.shape[1:], dtype=np.int64))
        _, _, begin, _ = self._entries[name]
        self._release_range(self._data_start + begin + start * row_bytes, (stop - start) * row_bytes)
        return target

    def _release_range(self, offset, length):
        if self._map is None or not hasattr(self._map, "madvise") or length <= 0:
            return
        page = mmap.PAGESIZE
        start = offset // page * page
        # Only whole pages inside the range: a neighbour's first page may still be in use.
        stop = (offset + length) // page * page
        if stop <= start:
            return
        try:
            self._map.madvise(mmap.MADV_DONTNEED, start, stop - start)
        except (OSError, ValueError, AttributeError):
            pass

    def release(self, name):
        """Drops the pages of tensor `name` from resident memory (they stay readable)."""
        _, _, begin, end = self._entries[name]
        self._release_range(self._data_start + begin, end - begin)

    def close(self):
        # Arrays handed out keep the map alive; closing is left to the garbage collector.
        self._map = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_safetensors(path):
    """Returns `{name: numpy array}` memory-mapped from the safetensors file at `path`.

    Example:
    >>> tensors = read_safetensors("model.safetensors")
    >>> tensors["model.norm.weight"].shape
    (2048,)
    """
    weights = SafetensorsFile(path)
    return {name: weights[name] for name in weights.keys()}


def write_safetensors(path, tensors, metadata=None):
    """Writes `{name: numpy array}` to `path` in the safetensors format."""
    header = {}
    offset = 0
    arrays = []
    for name, array in tensors.items():
        array = np.ascontiguousarray(array)
        dtype = _NAMES.get(array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype)
        if dtype is None:
            raise SafetensorsError(f"cannot write tensor {name!r} of dtype {array.dtype}.")
        header[name] = {
            "dtype": dtype,
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
        arrays.append(array)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(encoded)))
        file.write(encoded)
        for array in arrays:
            file.write(array.tobytes())
