"""Malformed and hostile weight and tokenizer files give one clear error, before any large
allocation, naming what is wrong (the file entry and the value) and what to do.

Each file is written byte by byte here, lying in one way: a safetensors header whose offsets,
shapes or dtypes lie, overlap or overflow; a GGUF header with absurd counts or dimensions
(refused before the `gguf` package would loop or allocate on them); tokenizer files that do
not parse. Config files, handles and links are in test_bad_presets.py; arguments in
test_bad_arguments.py.
"""

import json
import struct
import tracemalloc

import numpy as np
import pytest

from keras_gemma import GemmaTokenizer
from keras_gemma.checkpoints import gguf as gguf_checkpoint
from keras_gemma.checkpoints.safetensors_io import SafetensorsError, SafetensorsFile
from keras_gemma.checkpoints.tokenizer_json import sentencepiece_proto_from_tokenizer_json

DOWNLOAD_AGAIN = "Download or convert the file again"


def _safetensors(path, header, data=b"\0" * 64, raw_header=None):
    encoded = raw_header if raw_header is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
    return str(path)


def _tensor(dtype="F32", shape=(4, 4), offsets=(0, 64)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


# (id, header, what the message must say). Each header lies in one way; 64 data bytes follow.
_SAFETENSORS_LIES = [
    ("offsets_past_end", {"w": _tensor(shape=(4, 8), offsets=(0, 128))},
     r"tensor 'w' of shape \(4, 8\) needs bytes 0..128 of data, the file holds 64"),
    ("negative_offset", {"w": _tensor(offsets=(-64, 0))},
     r"tensor 'w' has data_offsets \[-64, 0\], not \[begin, end\] with 0 <= begin <= end"),
    ("begin_after_end", {"w": _tensor(offsets=(64, 0))},
     r"tensor 'w' has data_offsets \[64, 0\]"),
    ("dtype_size_mismatch", {"w": _tensor(dtype="F16", shape=(4, 4), offsets=(0, 64))},
     r"tensor 'w' of dtype F16 and shape \(4, 4\) needs 32 bytes, but its data_offsets "
     r"\[0, 64\] span 64"),
    ("overlapping_tensors", {"a": _tensor(shape=(2, 4), offsets=(0, 32)),
                             "b": _tensor(shape=(2, 4), offsets=(16, 48))},
     r"tensor 'b' overlaps tensor 'a' \(its data begins at byte 16, before 'a' ends at 32\)"),
    # 2**62 * 2**2 elements * 4 bytes wraps to 0 in int64: the lie a numpy product would hide.
    ("shape_overflowing_int64", {"w": _tensor(shape=(2**62, 4), offsets=(0, 0))},
     r"tensor 'w' of dtype F32 and shape \(4611686018427387904, 4\) needs "
     r"73786976294838206464 bytes"),
    ("negative_dimension", {"w": _tensor(shape=(-4, 4))},
     r"tensor 'w' has shape \[-4, 4\], not a list of non-negative integers"),
    ("string_offsets", {"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": ["0", "64"]}},
     r"tensor 'w' has data_offsets \['0', '64'\]"),
    ("entry_not_an_object", {"w": [0, 64]},
     r"tensor 'w' has the header entry \[0, 64\] instead of an object"),
    ("header_is_a_list", [1, 2], r"a JSON list instead of an object of tensors"),
]


@pytest.mark.parametrize("header, message", [case[1:] for case in _SAFETENSORS_LIES],
                         ids=[case[0] for case in _SAFETENSORS_LIES])
def test_safetensors_header_that_lies(tmp_path, header, message):
    path = _safetensors(tmp_path / "model.safetensors", header)
    with pytest.raises(SafetensorsError, match=message) as error:
        SafetensorsFile(path)
    assert path in str(error.value) and DOWNLOAD_AGAIN in str(error.value)


def test_safetensors_unknown_dtype(tmp_path):
    path = _safetensors(tmp_path / "model.safetensors", {"w": _tensor(dtype="F8_E4M3")})
    with pytest.raises(SafetensorsError, match=r"tensor 'w' has dtype 'F8_E4M3', which "
                                               r"keras_gemma cannot read \(supported: \["):
        SafetensorsFile(path)


def test_safetensors_absurd_header_length(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 2**63) + b"{}")
    with pytest.raises(SafetensorsError, match=r"its header claims 9223372036854775808 bytes "
                                               r"but the file has 10 .*" + DOWNLOAD_AGAIN):
        SafetensorsFile(str(path))


def test_safetensors_header_not_json(tmp_path):
    path = _safetensors(tmp_path / "model.safetensors", None, raw_header=b"{'w': pickle}  ")
    with pytest.raises(SafetensorsError, match=r"corrupt safetensors header \(not JSON: .*\). "
                                               + DOWNLOAD_AGAIN):
        SafetensorsFile(path)


# GGUF files written byte by byte (version 3, little-endian).
def _string(text):
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def _gguf(path, entries=(), tensors=(), tensor_count=None, entry_count=None, data=b""):
    header = b"GGUF" + struct.pack("<IQQ", 3, len(tensors) if tensor_count is None else
                                   tensor_count, len(entries) if entry_count is None else
                                   entry_count)
    body = b"".join(entries)
    for name, dims, type_id, offset in tensors:
        body += _string(name) + struct.pack("<I", len(dims))
        body += struct.pack(f"<{len(dims)}Q", *dims) + struct.pack("<IQ", type_id, offset)
    content = header + body
    content += b"\0" * (-len(content) % 32) + data
    path.write_bytes(content)
    return str(path)


_ARCHITECTURE = _string("general.architecture") + struct.pack("<I", 8) + _string("gemma")
_F32 = 0


@pytest.mark.parametrize(
    "entries, tensors, counts, message",
    [
        ([_ARCHITECTURE], [], (2**60, None),
         r"claims 1152921504606846976 tensors and 1 metadata entries, more than a \d+-byte file"),
        ([_ARCHITECTURE], [], (None, 2**60),
         r"claims 0 tensors and 1152921504606846976 metadata entries"),
        # An array whose length gguf's reader would loop over item by item.
        ([_string("tokenizer.ggml.scores") + struct.pack("<IIQ", 9, 6, 2**60)], [], (None, None),
         r"metadata array 'tokenizer.ggml.scores' claims 1152921504606846976 items, which cannot "
         r"fit in the \d+ bytes left"),
        ([_string("general.name") + struct.pack("<IQ", 8, 2**62)], [], (None, None),
         r"the string value of 'general.name' claims 4611686018427387904 bytes"),
        ([_ARCHITECTURE], [("token_embd.weight", [4] * 9, _F32, 0)], (None, None),
         r"tensor 'token_embd.weight' claims 9 dimensions \(GGUF allows 1 to 4\)"),
        ([_ARCHITECTURE], [("token_embd.weight", [8, 4], 99, 0)], (None, None),
         r"tensor 'token_embd.weight' has unknown GGUF tensor type 99"),
    ],
    ids=["tensor_count", "metadata_count", "array_length", "string_length", "dimension_count",
         "tensor_type"],
)
def test_gguf_header_with_absurd_counts(tmp_path, entries, tensors, counts, message):
    path = _gguf(tmp_path / "bad.gguf", entries, tensors, *counts, data=b"\0" * 128)
    with pytest.raises(ValueError, match=message) as error:
        gguf_checkpoint.open_gguf(path)
    assert path in str(error.value) and "download or assemble it again" in str(error.value)


def test_gguf_tensor_of_2_to_the_60_elements_is_refused_without_allocating(tmp_path):
    path = _gguf(tmp_path / "huge.gguf", [_ARCHITECTURE],
                 [("token_embd.weight", [2**30, 2**30], _F32, 0)], data=b"\0" * 128)
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=r"tensor 'token_embd.weight' claims dimensions "
                                             r"\[1073741824, 1073741824\] \(1152921504606846976 "
                                             r"elements, 4611686018427387904 bytes"):
            gguf_checkpoint.open_gguf(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, peak  # bytes: nothing in proportion to what the header claims


def _gguf_with_metadata(path, **metadata):
    import gguf

    writer = gguf.GGUFWriter(str(path), "gemma")
    for key, value in metadata.items():
        key = "gemma." + key.replace("__", ".")
        (writer.add_string if isinstance(value, str) else writer.add_uint32)(key, value)
    writer.add_tensor("token_embd.weight", np.zeros((96, 32), "float32"))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


_GEMMA_METADATA = dict(embedding_length=32, block_count=2, feed_forward_length=32,
                       attention__head_count=4, attention__head_count_kv=2)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"embedding_length": "thirty-two"},
         r"`gemma.embedding_length` must be an integer, got 'thirty-two' \(str\)"),
        ({"block_count": 0}, r"`gemma.block_count` \(GemmaBackbone's `num_layers`\) must be a "
                             r"positive integer, got 0"),
        ({"attention__head_count_kv": 3}, r"`gemma.attention.head_count_kv` \(GemmaBackbone's "
                                          r"`num_key_value_heads`\) must divide the number of "
                                          r"query heads \(4\), got 3"),
    ],
    ids=["string_size", "zero_layers", "heads_not_dividing"],
)
def test_gguf_metadata_with_wrong_values(tmp_path, overrides, message):
    path = _gguf_with_metadata(tmp_path / "bad.gguf", **{**_GEMMA_METADATA, **overrides})
    reader = gguf_checkpoint.open_gguf(path)
    with pytest.raises(ValueError, match=message) as error:
        gguf_checkpoint.backbone_arguments(reader)
    assert path in str(error.value) and "download the checkpoint again" in str(error.value)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\x0a\xff\xff\xff\xff\x0fgarbage", r"is not a valid SentencePiece model \(could not "
                                             r"parse 13 bytes"),
        (b"", r"is an empty SentencePiece model"),
    ],
    ids=["garbage", "empty"],
)
def test_sentencepiece_model_that_does_not_parse(tmp_path, content, message):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as error:
        GemmaTokenizer(proto=str(path))
    assert f"`proto` ({str(path)!r})" in str(error.value)
    assert "Pass the tokenizer.model of a Gemma checkpoint" in str(error.value)


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"model": {"type": "BPE", "vocab"', r"is not valid JSON"),
        ('{"model": {"type": "WordPiece", "vocab": {}}}', r"Gemma's tokenizer is a BPE model; "
                                                          r"this one is 'WordPiece'"),
        ('["<pad>", "<eos>"]', r"does not hold a tokenizer \(a JSON object\)"),
    ],
    ids=["not_json", "wordpiece", "a_list"],
)
def test_tokenizer_json_that_does_not_parse(tmp_path, content, message):
    path = tmp_path / "tokenizer.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as error:
        sentencepiece_proto_from_tokenizer_json(str(path))
    assert str(path) in str(error.value)
    assert "Pass the tokenizer.json of a Gemma checkpoint" in str(error.value)
