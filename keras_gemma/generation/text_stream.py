"""Incremental detokenization for streaming."""


class TextStream:
    """Turns token ids, one at a time, into text pieces that are safe to print.

    SentencePiece decodes a sequence, not a token: a character split into byte tokens
    (`<0xE2><0x82><0xAC>` is "€") decodes to U+FFFD until its last byte arrives, and a
    piece's leading space may depend on what precedes it. So the whole continuation is
    decoded each time and only the new, complete text is emitted; a trailing U+FFFD is held
    back until the next token completes the character (or `flush()` gives up on it).
    Special tokens (pad, bos, eos) are skipped, as `generate_postprocess` does; turn markers
    that the model writes inside its reply are text, as there.

    Args:
        tokenizer: a `GemmaTokenizer` (anything with `detokenize` and `special_token_ids`).

    Example:
    >>> stream = TextStream(tokenizer)
    >>> "".join(stream.add(t) for t in tokenizer("Ein Preis von 5€")) + stream.flush()
    'Ein Preis von 5€'
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._skip = set(getattr(tokenizer, "special_token_ids", ()))
        self._ids = []
        self._emitted = ""

    def add(self, token_id):
        """Adds one token; returns the text it completes (often "", never a partial character)."""
        token_id = int(token_id)
        if token_id in self._skip:
            return ""
        self._ids.append(token_id)
        text = self.tokenizer.detokenize(self._ids)
        if text.endswith("\ufffd"):
            return ""
        return self._advance(text)

    def flush(self):
        """The text still held back (an incomplete character decodes as U+FFFD)."""
        if not self._ids:
            return ""
        return self._advance(self.tokenizer.detokenize(self._ids))

    def _advance(self, text):
        # SentencePiece decoding of a longer sequence extends the shorter one's text (bytes
        # aside, handled above), so the new piece is what lies past the emitted length.
        piece = text[len(self._emitted):]
        self._emitted = text
        return piece
