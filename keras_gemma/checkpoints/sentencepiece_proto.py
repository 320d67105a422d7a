"""Writing and reading a SentencePiece ModelProto (sentencepiece_model.proto) with no protobuf.

Two loaders rebuild Gemma's SentencePiece model from another format: GGUF vocabularies and
transformers' tokenizer.json. Both write the same three parts of the message: the pieces
(field 1), the TrainerSpec (field 2) and the NormalizerSpec (field 3). The GGUF export reads
the pieces back. The wire format is small enough to handle by hand, so none of them needs
`protobuf` installed.
"""

import struct

# SentencePiece piece types.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
BPE = 2  # TrainerSpec.model_type


def _varint(value):
    value &= (1 << 64) - 1  # negative int32 values are written as 10-byte two's complement
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def encode_message(fields):
    """Serializes (field number, value) pairs in field-number order.

    bool/int -> varint, float -> fixed32, str/bytes -> length-delimited; a list value is a
    repeated field.

    Example:
    >>> encode_message([(4, 300), (40, -1)])   # TrainerSpec: vocab_size 300, unk_id -1
    b' \\xac\\x02@\\xff\\xff\\xff\\xff\\xff\\xff\\xff\\xff\\xff\\x01'
    """
    out = bytearray()
    for number, value in sorted(fields, key=lambda field: field[0]):
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, float):
                out += _varint(number << 3 | 5) + struct.pack("<f", item)
            elif isinstance(item, (bool, int)):
                out += _varint(number << 3) + _varint(int(item))
            else:
                data = item.encode("utf-8") if isinstance(item, str) else bytes(item)
                out += _varint(number << 3 | 2) + _varint(len(data)) + data
    return bytes(out)


def serialize_model(pieces, trainer, normalizer):
    """A ModelProto from `(piece, score, type)` triples and the two specs' (number, value)s."""
    out = bytearray()
    for piece, score, kind in pieces:
        out += encode_message([(1, encode_message([(1, piece), (2, float(score)), (3, kind)]))])
    out += encode_message([(2, encode_message(trainer)), (3, encode_message(normalizer))])
    return bytes(out)


def _read_varint(data, position):
    value = shift = 0
    while True:
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, position


def decode_message(data):
    """Yields (field number, wire type, value) of a protobuf message, in order.

    varint -> int, fixed32 -> float, fixed64 -> 8 bytes, length-delimited -> bytes.

    Example:
    >>> list(decode_message(encode_message([(4, 300), (1, "a")])))
    [(1, 2, b'a'), (4, 0, 300)]
    """
    position = 0
    while position < len(data):
        key, position = _read_varint(data, position)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, position = _read_varint(data, position)
        elif wire == 5:
            value, position = struct.unpack("<f", data[position:position + 4])[0], position + 4
        elif wire == 1:
            value, position = data[position:position + 8], position + 8
        elif wire == 2:
            length, position = _read_varint(data, position)
            value, position = data[position:position + length], position + length
        else:
            raise ValueError(f"the SentencePiece model has an unreadable field (wire type {wire}).")
        yield number, wire, value


def read_model(proto):
    """([(piece, score, type)], add_dummy_prefix) of a serialized SentencePiece ModelProto."""
    pieces, add_dummy_prefix = [], True  # SentencePiece's default when the spec omits it
    for number, _, value in decode_message(proto):
        if number == 1:  # SentencePiece
            piece, score, kind = "", 0.0, 1  # type defaults to NORMAL
            for field, _, item in decode_message(value):
                if field == 1:
                    piece = bytes(item).decode("utf-8")
                elif field == 2:
                    score = item
                elif field == 3:
                    kind = item
            pieces.append((piece, score, kind))
        elif number == 3:  # NormalizerSpec
            for field, _, item in decode_message(value):
                if field == 3:
                    add_dummy_prefix = bool(item)
    return pieces, add_dummy_prefix
