"""The SentencePiece model of a Gemma GGUF file, rebuilt from the vocabulary it stores."""

from keras_gemma.checkpoints.sentencepiece_proto import (
    BPE,
    CONTROL,
    NORMAL,
    UNKNOWN,
    USER_DEFINED,
    serialize_model,
)


def gguf_field(reader, key, default=None):
    """The value of a GGUF metadata field, or `default` when the file lacks it.

    Example:
    >>> gguf_field(reader, "general.architecture")
    'gemma3'
    """
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def sentencepiece_proto(reader):
    """The serialized SentencePiece model of a Gemma GGUF file's vocabulary.

    Gemma's tokenizer: BPE, byte fallback, split digits, identity normalizer, no dummy
    prefix. llama.cpp's conversion changed three things, undone here: `<unk>` is stored as
    CONTROL (SentencePiece needs it UNKNOWN); user-defined whitespace runs are stored with
    real spaces instead of '▁'; and added tokens such as `<start_of_turn>`, `<end_of_turn>`,
    `<mask>` and `<unusedN>` are marked CONTROL, which would make SentencePiece split them
    into characters, where Gemma's tokenizer has them USER_DEFINED (matched whole).
    """
    model = gguf_field(reader, "tokenizer.ggml.model")
    if model != "llama":
        raise ValueError(
            f"the GGUF tokenizer is {model!r}, not a SentencePiece ('llama') vocabulary; it is "
            "not Gemma's tokenizer."
        )

    def values(key):
        field = reader.fields.get(key)
        if field is None:
            raise ValueError(f"the GGUF file lacks {key}, needed to rebuild the tokenizer.")
        return [field.parts[i] for i in field.data]

    tokens = [bytes(part).decode("utf-8") for part in values("tokenizer.ggml.tokens")]
    scores = [float(part[0]) for part in values("tokenizer.ggml.scores")]
    types = [int(part[0]) for part in values("tokenizer.ggml.token_type")]
    ids = {name: gguf_field(reader, f"tokenizer.ggml.{name}_token_id")
           for name in ("unknown", "bos", "eos", "padding")}
    controls = {ids["bos"], ids["eos"], ids["padding"]}
    pieces = []
    for index, (piece, score, kind) in enumerate(zip(tokens, scores, types)):
        if index == ids["unknown"]:
            kind = UNKNOWN
        elif kind == CONTROL and index not in controls:
            kind = USER_DEFINED
        if kind == USER_DEFINED:
            piece = piece.replace(" ", "\u2581")
        if kind != NORMAL:
            score = 0.0  # SentencePiece gives meta pieces 0; llama.cpp wrote -1000
        pieces.append((piece, score, kind))
    if ids["unknown"] is None:
        raise ValueError("the GGUF vocabulary has no unknown-token id; SentencePiece needs one.")
    names = {"unknown": "<unk>", "bos": "<bos>", "eos": "<eos>", "padding": "<pad>"}
    special = {name: tokens[i] if i is not None else names[name] for name, i in ids.items()}
    trainer = [
        (3, BPE), (4, len(tokens)),  # model_type, vocab_size
        (25, True), (26, True), (35, True),  # split_digits, whitespace-only pieces, byte fallback
        (40, ids["unknown"]), (41, -1 if ids["bos"] is None else ids["bos"]),
        (42, -1 if ids["eos"] is None else ids["eos"]),
        (43, -1 if ids["padding"] is None else ids["padding"]),
        (45, special["unknown"]), (46, special["bos"]), (47, special["eos"]),
        (48, special["padding"]),
    ]
    # identity normalizer; dummy prefix as stored (off for Gemma); whitespace kept, escaped.
    dummy_prefix = bool(gguf_field(reader, "tokenizer.ggml.add_space_prefix", False))
    normalizer = [(1, "identity"), (3, dummy_prefix), (4, False), (5, True)]
    return serialize_model(pieces, trainer, normalizer)
