"""Writing a SentencePiece ModelProto (sentencepiece_model.proto) with no protobuf library.

Two loaders rebuild Gemma's SentencePiece model from another format: GGUF vocabularies and
transformers' tokenizer.json. Both write the same three parts of the message: the pieces
(field 1), the TrainerSpec (field 2) and the NormalizerSpec (field 3). The wire format is
small enough to write by hand, so neither loader needs `protobuf` installed.
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
