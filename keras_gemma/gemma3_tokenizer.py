"""Gemma3Tokenizer: GemmaTokenizer with KerasHub's Gemma 3 special tokens."""

import json
import os

import keras

from keras_gemma.tokenizer import GemmaTokenizer

# Piece names of KerasHub's Gemma 3 vision tokens, and the attribute each id goes under.
VISION_PIECES = {
    "start_of_image_token": "<start_of_image>",
    "image_placeholder": "<img>",
    "end_of_image_token": "<end_of_image>",
}


@keras.saving.register_keras_serializable(package="keras_gemma")
class Gemma3Tokenizer(GemmaTokenizer):
    """Gemma 3's SentencePiece tokenizer, as `keras_hub.models.Gemma3Tokenizer`.

    Tokenizes like `GemmaTokenizer` (same engines, same ids); what differs is KerasHub's
    Gemma 3 bookkeeping:
    - `has_vision_tokens` (default True, as in KerasHub): the vocabulary must then hold
      `<start_of_image>`, `<img>` and `<end_of_image>`, whose ids are
      `start_of_image_token_id`, `image_placeholder_id` (also `image_placeholder_token_id`)
      and `end_of_image_token_id` (-1 when False). keras_gemma generates text only; these
      ids only decide what `generate()` output keeps.
    - `special_token_ids` are KerasHub's: `<pad>`, `<bos>`, `<eos>` and, with vision tokens,
      the three above. The chat markers `<start_of_turn>` / `<end_of_turn>` are ordinary
      text here, so generated text keeps them.

    `from_preset` reads `has_vision_tokens` from a KerasHub preset's tokenizer.json; for
    other sources (text-only checkpoints) it is False, so that generated text keeps every
    piece but `<pad>`, `<bos>` and `<eos>` (Gemma 3's vocabulary has `<img>` as HTML text too).

    Args:
        proto: path to a SentencePiece `.model` file, or the file's bytes.
        has_vision_tokens: whether the vocabulary has (and the ids name) the vision pieces.
        sequence_length: as in `GemmaTokenizer`.

    Example:
    ```python
    tokenizer = keras_gemma.Gemma3Tokenizer.from_preset("gemma3_instruct_1b")
    tokenizer("The quick brown fox.")
    tokenizer = keras_gemma.Gemma3Tokenizer("tokenizer.model", has_vision_tokens=False)
    ```
    """

    def __init__(self, proto=None, has_vision_tokens=True, **kwargs):
        super().__init__(proto=proto, **kwargs)
        self.has_vision_tokens = bool(has_vision_tokens)
        self._set_vision_ids()

    def _set_proto(self, proto):
        super()._set_proto(proto)
        if hasattr(self, "has_vision_tokens"):  # load_assets: a new vocabulary, new ids
            self._set_vision_ids()

    def _set_vision_ids(self):
        for attribute, piece in VISION_PIECES.items():
            if not self.has_vision_tokens:
                setattr(self, f"{attribute}_id", -1)
                continue
            index = self._find_piece(piece)
            if index is None:
                raise ValueError(
                    f"Gemma3Tokenizer: the vocabulary has no {piece!r} piece, which "
                    "has_vision_tokens=True needs. Pass has_vision_tokens=False for a "
                    "vocabulary without vision tokens."
                )
            setattr(self, attribute, piece)
            setattr(self, f"{attribute}_id", index)
        # KerasHub names the placeholder's id `image_placeholder_id` with vision tokens and
        # `image_placeholder_token_id` without; both names answer here.
        self.image_placeholder_token_id = self.image_placeholder_id

    @property
    def special_token_ids(self):
        """`<pad>`, `<bos>`, `<eos>` and, with vision tokens, the three vision pieces."""
        ids = {self.pad_token_id, self.start_token_id, self.end_token_id}
        if self.has_vision_tokens:
            ids |= {getattr(self, f"{attribute}_id") for attribute in VISION_PIECES}
        return sorted(ids)

    @classmethod
    def from_preset(cls, preset, **kwargs):
        """The tokenizer of a Gemma 3 preset name, directory, .gguf file or hub handle.

        Example:
        >>> tokenizer = Gemma3Tokenizer.from_preset("gemma3_270m")
        """
        from keras_gemma.checkpoints.loader import resolve, tokenizer_proto
        from keras_gemma.checkpoints.preset_parts import saved_tokenizer_config

        resolved = resolve(preset)
        config = {**saved_tokenizer_config(resolved), **kwargs}
        if "has_vision_tokens" not in config:
            config["has_vision_tokens"] = _saved_has_vision_tokens(resolved)
        return cls(proto=tokenizer_proto(resolved), **config)

    def get_config(self):
        config = super().get_config()
        config["has_vision_tokens"] = self.has_vision_tokens
        return config


def _saved_has_vision_tokens(resolved):
    """`has_vision_tokens` as a KerasHub preset's tokenizer.json says (KerasHub's default,
    True, when it does not say); False for other sources."""
    path = os.path.join(resolved.path, "tokenizer.json")
    if resolved.kind != "keras_hub" or not os.path.exists(path):
        return False
    with open(path) as file:
        config = json.load(file)
    # Read as data: nothing the file names is imported.
    return bool((config.get("config") or {}).get("has_vision_tokens", True))
