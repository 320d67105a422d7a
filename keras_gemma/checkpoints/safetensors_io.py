"""Reading and writing safetensors files with numpy alone.

We parse the format ourselves (an 8-byte little-endian header length, a JSON header, then
raw little-endian tensors) so that tensors are memory-mapped rather than copied, bfloat16
comes back as an `ml_dtypes` array without torch, and a truncated or corrupt file is
detected before any tensor is used.
"""

import json
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


def read_safetensors(path):
    """Returns `{name: numpy array}` memory-mapped from the safetensors file at `path`.

    Example:
    >>> tensors = read_safetensors("model.safetensors")
    >>> tensors["model.norm.weight"].shape
    (2048,)
    """
    size = os.path.getsize(path)
    with open(path, "rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            raise SafetensorsError(f"{path} is not a safetensors file: it has {size} bytes.")
        (header_length,) = struct.unpack("<Q", prefix)
        if header_length > min(_MAX_HEADER_BYTES, size - 8):
            raise SafetensorsError(
                f"{path} is not a safetensors file or is truncated: its header claims "
                f"{header_length} bytes but the file has {size}."
            )
        try:
            header = json.loads(file.read(header_length))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise SafetensorsError(f"{path} has a corrupt safetensors header: {error}") from None
    header.pop("__metadata__", None)
    data_start = 8 + header_length
    data_size = size - data_start
    if not header:
        return {}
    mapped = np.memmap(path, dtype=np.uint8, mode="r", offset=data_start, shape=(data_size,))
    tensors = {}
    for name, entry in header.items():
        dtype = _DTYPES.get(entry.get("dtype"))
        if dtype is None:
            raise SafetensorsError(
                f"{path}: tensor {name!r} has dtype {entry.get('dtype')!r}, which keras_gemma "
                f"cannot read (supported: {sorted(_DTYPES)})."
            )
        begin, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if end > data_size or end - begin != expected:
            raise SafetensorsError(
                f"{path} is truncated or corrupt: tensor {name!r} of shape {shape} needs bytes "
                f"{begin}..{begin + expected}, the file holds {data_size} bytes of data."
            )
        tensors[name] = mapped[begin:end].view(dtype).reshape(shape)
    return tensors


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
