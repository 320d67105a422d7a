"""Gemma's SentencePiece model rebuilt from a Hugging Face `tokenizer.json`.

transformers 5 saves a Gemma tokenizer as `tokenizer.json` only, without SentencePiece's
`tokenizer.model`, which `GemmaTokenizer` needs. `tokenizer.json` holds everything the model
needs to encode, so the model is rebuilt from it:

- pieces: `model.vocab` in id order. Types as in Gemma's own model: `<unk>` UNKNOWN; `<pad>`,
  `<eos>`, `<bos>` CONTROL (never matched in text); `<0xNN>` BYTE; every other added token
  USER_DEFINED (matched greedily in text before BPE: `<start_of_turn>`, whitespace runs,
  `<mask>`, `<unusedN>`...; transformers calls some of them "special", `<mask>` among them,
  but Gemma's model matches them in text); the rest NORMAL. Added tokens with ids past
  `model.vocab` (Gemma 3's `<image_soft_token>`) are transformers' own, not SentencePiece
  pieces, and are left out.
- scores: tokenizers merges, at each step, the adjacent pair with the lowest merge rank;
  SentencePiece merges the adjacent pair whose concatenation is the piece with the highest
  score. Both take the leftmost on ties. So NORMAL pieces are ordered by the rank of the first
  merge that creates them and scored 0, -1, -2, ...: the piece orders then agree. Merges that
  create the same piece get one score, as in the original model, where a piece has one score
  whichever pair it is built from (transformers writes them next to each other). Pieces no
  merge creates (single characters) come after, in id order; SentencePiece cannot build them
  either, since transformers writes a merge for every way of splitting a piece into two
  pieces. A `tokenizer.json` whose merges SentencePiece scores cannot express (interleaved
  merges of two pieces, or a piece missing the merge of two of its NORMAL halves) is still
  converted, with a warning that some texts may encode differently.
- specs as in Gemma's model: BPE, byte fallback, split digits, the identity normalizer
  without dummy prefix or whitespace folding.
"""

import json
import os
import re
import warnings

from keras_gemma.checkpoints.sentencepiece_proto import (
    BPE,
    BYTE,
    CONTROL,
    NORMAL,
    UNKNOWN,
    USER_DEFINED,
    serialize_model,
)

_SPECIAL = ("<pad>", "<eos>", "<bos>", "<unk>")
_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")
_WHERE = "sentencepiece_proto_from_tokenizer_json"
_ADVICE = ("Pass the tokenizer.json of a Gemma checkpoint (transformers' save_pretrained writes "
           "it); if it came with a download, download it again.")


def sentencepiece_proto_from_tokenizer_json(path_or_dict):
    """Gemma's SentencePiece model (serialized `ModelProto` bytes) from a `tokenizer.json`.

    Args:
        path_or_dict: path to a `tokenizer.json`, a directory holding one (what
            `save_pretrained` writes), or the parsed JSON as a dict.

    Returns:
        The bytes of a SentencePiece `.model` file, for `GemmaTokenizer(proto=...)`.

    Raises:
        ValueError: the file is missing or is not a Gemma tokenizer: not a BPE model with
            byte fallback, no `<pad>`, `<eos>`, `<bos>` or `<unk>`, or other normalization.
        TypeError: `path_or_dict` is neither a path nor a dict.

    Example:
    ```python
    from transformers import AutoTokenizer
    AutoTokenizer.from_pretrained("google/gemma-2b").save_pretrained("hf_tokenizer")
    proto = sentencepiece_proto_from_tokenizer_json("hf_tokenizer/tokenizer.json")
    tokenizer = keras_gemma.GemmaTokenizer(proto=proto)
    with open("tokenizer.model", "wb") as f:  # or keep the file
        f.write(proto)
    ```
    """
    data = _load(path_or_dict)
    source = "" if isinstance(path_or_dict, dict) else f" (in {os.fspath(path_or_dict)!r})"
    try:
        return _proto_from_tokenizer(data)
    except ValueError as error:
        raise ValueError(f"{error}{source} {_ADVICE}") from None


def _proto_from_tokenizer(data):
    """The body of `sentencepiece_proto_from_tokenizer_json`, on the parsed JSON."""
    model = data.get("model")
    if not isinstance(model, dict):
        raise ValueError(f"{_WHERE}: tokenizer.json has no `model` (a JSON object).")
    kind = model.get("type", "BPE" if "merges" in model else None)  # old files omit "type"
    if kind != "BPE":
        raise ValueError(f"{_WHERE}: Gemma's tokenizer is a BPE model; this one is {kind!r}.")
    if not model.get("byte_fallback"):
        raise ValueError(
            f"{_WHERE}: the BPE model has no byte fallback (`byte_fallback` is not true), "
            "which Gemma's tokenizer has."
        )
    for key in ("continuing_subword_prefix", "end_of_word_suffix", "dropout"):
        if model.get(key):
            raise ValueError(f"{_WHERE}: `{key}` is set; SentencePiece has no such option.")
    _check_normalization(data)

    pieces = _pieces_by_id(model.get("vocab"), data.get("added_tokens") or [])
    ids = {piece: i for i, piece in enumerate(pieces)}
    missing = [p for p in _SPECIAL if p not in ids]
    if missing:
        raise ValueError(
            f"{_WHERE}: the vocabulary has no {', '.join(missing)} piece, which every Gemma "
            "vocabulary has. Is this a Gemma tokenizer.json?"
        )
    added = {t.get("content") for t in data.get("added_tokens") or [] if isinstance(t, dict)}
    types = [_piece_type(piece, added) for piece in pieces]
    bytes_found = {piece for piece, t in zip(pieces, types) if t == BYTE}
    if len(bytes_found) != 256:
        raise ValueError(
            f"{_WHERE}: byte fallback needs the 256 pieces <0x00>..<0xFF>; the vocabulary "
            f"has {len(bytes_found)}."
        )
    merges = _merges(model.get("merges") or [], ids)
    scores = _scores(pieces, types, merges)
    _warn_inexpressible_merges(pieces, types, merges)

    trainer = [
        (3, BPE),  # model_type
        (4, len(pieces)),  # vocab_size
        (25, True),  # split_digits
        (26, True),  # allow_whitespace_only_pieces
        (31, [p for p, t in zip(pieces, types) if t == USER_DEFINED]),  # user_defined_symbols
        (35, True),  # byte_fallback
    ]
    # TrainerSpec field numbers: unk/bos/eos/pad ids 40..43, their pieces 45..48.
    for offset, piece in enumerate(["<unk>", "<bos>", "<eos>", "<pad>"]):
        trainer.append((40 + offset, ids[piece]))
        trainer.append((45 + offset, piece))
    # name, precompiled_charsmap, add_dummy_prefix, remove_extra_whitespaces, escape_whitespaces
    normalizer = [(1, "identity"), (2, b""), (3, False), (4, False), (5, True)]
    return serialize_model(list(zip(pieces, scores, types)), trainer, normalizer)


def _load(path_or_dict):
    if isinstance(path_or_dict, dict):
        return path_or_dict
    if isinstance(path_or_dict, os.PathLike):
        path_or_dict = os.fspath(path_or_dict)
    if not isinstance(path_or_dict, str):
        raise TypeError(
            f"{_WHERE} expects a path to tokenizer.json (or its directory) or the parsed JSON "
            f"dict. Received: {type(path_or_dict).__name__}."
        )
    path = path_or_dict
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
        raise ValueError(f"{_WHERE}: tokenizer.json not found: '{path}'.")
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{_WHERE}: '{path}' is not valid JSON ({e}). {_ADVICE}") from None
    if not isinstance(data, dict):
        raise ValueError(
            f"{_WHERE}: '{path}' does not hold a tokenizer (a JSON object). {_ADVICE}"
        )
    return data


def _components(node):
    """A normalizer or pre-tokenizer as a flat list of its parts (Sequences unrolled)."""
    if node is None:
        return []
    if not isinstance(node, dict):
        raise ValueError(f"{_WHERE}: expected a JSON object for a normalizer, got {node!r}.")
    if node.get("type") == "Sequence":
        parts = node.get("normalizers", node.get("pretokenizers", []))
        return [leaf for part in parts for leaf in _components(part)]
    return [node]


def _check_normalization(data):
    """Gemma's text reaches BPE with each space turned into "▁" and nothing else changed."""
    escapes = 0
    for part in _components(data.get("normalizer")):
        if part.get("type") == "Replace" and part.get("pattern") == {"String": " "} and (
            part.get("content") == "\u2581"
        ):
            escapes += 1
        else:
            raise ValueError(
                f"{_WHERE}: the normalizer {part.get('type')!r} changes the text in a way "
                "Gemma's tokenizer (identity normalization, spaces as '▁') does not."
            )
    for part in _components(data.get("pre_tokenizer")):
        kind = part.get("type")
        if kind == "Split" and part.get("pattern") == {"String": " "} and escapes:
            continue  # no spaces are left after the normalizer: a no-op
        if (
            kind == "Metaspace"
            and part.get("replacement") == "\u2581"
            and part.get("prepend_scheme", "never") == "never"
            and not part.get("add_prefix_space", False)
            and not part.get("split", False)
        ):
            escapes += 1
            continue
        raise ValueError(
            f"{_WHERE}: the pre-tokenizer {kind!r} splits or changes the text in a way Gemma's "
            "tokenizer does not (Gemma adds no prefix space and does not pre-split)."
        )
    if escapes != 1:
        raise ValueError(
            f"{_WHERE}: Gemma's tokenizer writes each space as '▁' before BPE; this "
            f"tokenizer.json does so {escapes} times."
        )


def _pieces_by_id(vocab, added_tokens):
    if not isinstance(vocab, dict) or not vocab:
        raise ValueError(f"{_WHERE}: the BPE model has no vocabulary (`model.vocab`).")
    pieces = [None] * len(vocab)
    for piece, i in vocab.items():
        if not isinstance(i, int) or not 0 <= i < len(pieces) or pieces[i] is not None:
            raise ValueError(
                f"{_WHERE}: vocabulary ids must run from 0 to {len(pieces) - 1} without gaps "
                f"or repeats; {piece!r} has id {i!r}."
            )
        pieces[i] = piece
    for token in added_tokens:
        i = token.get("id") if isinstance(token, dict) else None
        if isinstance(i, int) and 0 <= i < len(pieces) and token.get("content") != pieces[i]:
            raise ValueError(
                f"{_WHERE}: added token {token.get('content')!r} has id {i}, which the "
                f"vocabulary gives to {pieces[i]!r}."
            )
    return pieces


def _piece_type(piece, added):
    if piece == "<unk>":
        return UNKNOWN
    if piece in _SPECIAL:
        return CONTROL
    if _BYTE_PIECE.fullmatch(piece):
        return BYTE
    return USER_DEFINED if piece in added else NORMAL


def _merges(raw, ids):
    """[(left, right)] in rank order, from either layout ("a b" strings or [a, b] pairs)."""
    merges = []
    for rank, merge in enumerate(raw):
        pair = merge.split(" ") if isinstance(merge, str) else merge
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise ValueError(f"{_WHERE}: merge {rank} is not a pair of pieces: {merge!r}.")
        left, right = pair
        for piece in (left, right, left + right):
            if piece not in ids:
                raise ValueError(
                    f"{_WHERE}: merge {rank} ({left!r}, {right!r}) uses {piece!r}, which is "
                    "not in the vocabulary."
                )
        merges.append((left, right))
    return merges


def _scores(pieces, types, merges):
    """0, -1, -2, ... for NORMAL pieces by their first merge's rank, then the rest by id."""
    first_rank = {}
    for rank, (left, right) in enumerate(merges):
        first_rank.setdefault(left + right, rank)
    normal = [i for i, t in enumerate(types) if t == NORMAL]
    merged = [i for i in normal if pieces[i] in first_rank]
    merged.sort(key=lambda i: first_rank[pieces[i]])
    unmerged = [i for i in normal if pieces[i] not in first_rank]
    scores = [0.0] * len(pieces)
    for position, i in enumerate(merged + unmerged):
        scores[i] = -float(position)
    return scores


def _warn_inexpressible_merges(pieces, types, merges):
    """Warn when piece scores cannot reproduce the merge ranks (never for transformers' files).

    Only merges SentencePiece can make count: of two NORMAL pieces into a NORMAL piece
    (USER_DEFINED pieces are matched whole and never merged).
    """
    normal = {piece for piece, t in zip(pieces, types) if t == NORMAL}
    usable = [(a, b) for a, b in merges if a in normal and b in normal and a + b in normal]
    problems = []
    done, current = set(), None
    for left, right in usable:
        piece = left + right
        if piece != current:
            if piece in done:
                problems.append(f"the merges creating {piece!r} are not next to each other")
            done.add(current)
            current = piece
    known = set(usable)
    for piece in (p for p, t in zip(pieces, types) if t == NORMAL):
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal and (left, right) not in known:
                problems.append(f"no merge ({left!r}, {right!r}) creates {piece!r}")
    if problems:
        warnings.warn(
            f"{_WHERE}: {len(problems)} merge rule(s) of this tokenizer.json cannot be written "
            f"as SentencePiece piece scores (e.g. {'; '.join(problems[:3])}); the rebuilt model "
            "may encode some texts differently from it.",
            stacklevel=3,
        )
