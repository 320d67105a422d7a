"""A GGUF file's header walked and bounded before the `gguf` package reads it.

`gguf.GGUFReader` trusts the counts it reads: an array claiming 2**60 items makes it loop
(and append) 2**60 times, and a tensor claiming 2**60 elements fails only later, as a
reshape error that names nothing. `check_gguf_header` walks the same layout with `struct`
over a memory map, holding nothing but offsets, and refuses the first count, length or
tensor size that cannot fit in the file, naming it.

GGUF (versions 2 and 3): b"GGUF", uint32 version, uint64 tensor count, uint64 metadata count;
each metadata entry a string key, a uint32 type and a value (a uint64-length string, an
array: uint32 item type, uint64 count, items, or a scalar); then each tensor's name, uint32
dimension count, uint64 dimensions, uint32 type and uint64 data offset.

Example:
>>> check_gguf_header("gemma-3-270m-q4_k_m.gguf")     # returns None, or raises ValueError
"""

import mmap
import os
import struct

# Value type -> size in bytes of the scalar types.
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
_MAX_DIMENSIONS = 4  # llama.cpp's GGML_MAX_DIMS
# The fewest bytes one metadata entry (empty key, a one-byte value) and one tensor entry
# (empty name, no dimensions) can take: a count larger than the file allows is a lie.
_MIN_ENTRY_BYTES, _MIN_TENSOR_BYTES = 8 + 4 + 1, 8 + 4 + 4 + 8
_FIX = "The file is corrupt or not what it claims: download or assemble it again."


class _Cursor:
    """Reads little-endian values from a buffer, refusing to read past its end."""

    def __init__(self, buffer, path):
        self.buffer, self.path, self.offset = buffer, path, 0

    def remaining(self):
        return len(self.buffer) - self.offset

    def fail(self, what):
        raise ValueError(f"{self.path} is truncated or has a corrupt GGUF header: {what}. {_FIX}")

    def unpack(self, fmt, what):
        size = struct.calcsize(fmt)
        if size > self.remaining():
            self.fail(f"{what} at byte {self.offset} runs past the end of the file")
        (value,) = struct.unpack_from(fmt, self.buffer, self.offset)
        self.offset += size
        return value

    def skip(self, count, what):
        if count > self.remaining():
            self.fail(
                f"{what} claims {count} bytes at byte {self.offset}, but only "
                f"{self.remaining()} are left in the file"
            )
        self.offset += count

    def string(self, what, keep=True):
        length = self.unpack("<Q", f"the length of {what}")
        start = self.offset
        self.skip(length, what)
        # Keys and tensor names are short; a value (a chat template) is skipped unread.
        return self.buffer[start:self.offset].decode("utf-8", "replace") if keep else None


def _skip_value(cursor, value_type, key):
    if value_type in _SCALAR_SIZES:
        cursor.skip(_SCALAR_SIZES[value_type], f"the value of {key!r}")
    elif value_type == _STRING:
        cursor.string(f"the string value of {key!r}", keep=False)
    elif value_type == _ARRAY:
        item_type = cursor.unpack("<I", f"the item type of array {key!r}")
        count = cursor.unpack("<Q", f"the length of array {key!r}")
        # Every item takes at least one byte (a string at least its 8-byte length).
        least = _SCALAR_SIZES.get(item_type, 8)
        if count * least > cursor.remaining():
            cursor.fail(
                f"metadata array {key!r} claims {count} items, which cannot fit in the "
                f"{cursor.remaining()} bytes left in the file"
            )
        if item_type in _SCALAR_SIZES:
            cursor.skip(count * least, f"array {key!r}")
        else:
            for _ in range(count):
                _skip_value(cursor, item_type, key)
    else:
        cursor.fail(f"metadata entry {key!r} has unknown value type {value_type}")


def _tensor_bytes(path, name, dims, type_id):
    from keras_gemma.checkpoints.gguf import _gguf_module

    gguf = _gguf_module()
    try:
        kind = gguf.GGMLQuantizationType(type_id)
        block, block_bytes = gguf.GGML_QUANT_SIZES[kind]
    except (ValueError, KeyError):
        raise ValueError(
            f"{path}: tensor {name!r} has unknown GGUF tensor type {type_id}. {_FIX}"
        ) from None
    elements = 1
    for dim in dims:
        elements *= dim  # Python integers: no overflow to hide a lie
    return elements * block_bytes // block, elements


def check_gguf_header(path):
    """Raises ValueError naming the first count, length or tensor of `path`'s GGUF header
    that cannot fit in the file; allocates nothing in proportion to what the header claims."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    if size < 24:
        raise ValueError(f"{path} is not a GGUF file: it has only {size} bytes. {_FIX}")
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
        _check(_Cursor(data, path), path, size)


def _check(cursor, path, size):
    cursor.skip(4, "the magic")
    version = cursor.unpack("<I", "the version")
    if version not in (2, 3):
        cursor.fail(f"GGUF version {version}; keras_gemma reads versions 2 and 3")
    tensor_count = cursor.unpack("<Q", "the tensor count")
    entry_count = cursor.unpack("<Q", "the metadata count")
    if tensor_count * _MIN_TENSOR_BYTES + entry_count * _MIN_ENTRY_BYTES > cursor.remaining():
        cursor.fail(
            f"it claims {tensor_count} tensors and {entry_count} metadata entries, more than "
            f"a {size}-byte file can hold"
        )
    for index in range(entry_count):
        key = cursor.string(f"the key of metadata entry {index}")
        _skip_value(cursor, cursor.unpack("<I", f"the type of {key!r}"), key)
    tensors = []
    for index in range(tensor_count):
        name = cursor.string(f"the name of tensor {index}")
        count = cursor.unpack("<I", f"the dimension count of tensor {name!r}")
        if not 1 <= count <= _MAX_DIMENSIONS:
            cursor.fail(f"tensor {name!r} claims {count} dimensions (GGUF allows 1 to 4)")
        dims = [cursor.unpack("<Q", f"dimension {i} of tensor {name!r}") for i in range(count)]
        type_id = cursor.unpack("<I", f"the type of tensor {name!r}")
        offset = cursor.unpack("<Q", f"the data offset of tensor {name!r}")
        tensors.append((name, dims, type_id, offset))
    data_start = cursor.offset  # before alignment padding: a lower bound, enough to bound sizes
    for name, dims, type_id, offset in tensors:
        nbytes, elements = _tensor_bytes(path, name, dims, type_id)
        if data_start + offset + nbytes > size:
            raise ValueError(
                f"{path} is truncated or corrupt: tensor {name!r} claims dimensions {dims} ({elements} elements, "
                f"{nbytes} bytes at data offset {offset}), more than the {size}-byte file "
                f"holds. {_FIX}"
            )
