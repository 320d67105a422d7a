"""ChatSession: a multi-turn conversation with a Gemma causal LM through its chat template."""

from keras_gemma.chat_template import chat_turns


class ChatSession:
    """Keeps a conversation's turns and asks the model for the next reply.

    Each call to `say` (or `stream`) appends the user's text, formats the whole history with
    the tokenizer's chat template (`<start_of_turn>user ... <end_of_turn>`, a leading system
    text folded into the first user turn), generates until the model closes its turn
    (`<end_of_turn>` or `<eos>`) and appends the reply as the model's turn. The marker is
    not part of the stored reply, so the next prompt is formatted exactly as the template
    says. The sampler is the model's (`lm.compile(sampler=...)`).

    Args:
        causal_lm: a `GemmaCausalLM` (or `Gemma3CausalLM`) with a preprocessor whose
            vocabulary has `<start_of_turn>` / `<end_of_turn>` (every Gemma vocabulary).
        system: optional instructions, sent as the first user turn's preamble.
        max_new_tokens: the longest reply, in tokens.

    Example:
    >>> chat = keras_gemma.ChatSession(lm, system="Answer briefly.")
    >>> chat.say("What is the capital of France?")
    'Paris.'
    >>> for piece in chat.stream("And of Italy?"):
    ...     print(piece, end="", flush=True)
    >>> chat.reset()            # forget the turns (the system text stays)
    """

    def __init__(self, causal_lm, system=None, max_new_tokens=256):
        if getattr(causal_lm, "preprocessor", None) is None:
            raise ValueError("ChatSession needs a causal LM with a preprocessor (a tokenizer).")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer; got {max_new_tokens!r}.")
        if system is not None and not isinstance(system, str):
            raise TypeError(f"system must be a string or None; got {type(system).__name__}.")
        self.causal_lm = causal_lm
        self.system = system
        self.max_new_tokens = max_new_tokens
        self.messages = []
        self.last_prompt = None

    @property
    def tokenizer(self):
        return self.causal_lm.preprocessor.tokenizer

    def prompt(self, text):
        """The prompt text the model would get if `text` were said next (nothing stored)."""
        history = self._history() + [{"role": "user", "content": text}]
        chat_turns(history)  # role order and types, with the template's own errors
        return self.tokenizer.apply_chat_template(history)

    def stream(self, text):
        """Yields the reply to `text` piece by piece; the turn is stored when it ends.

        If the caller stops early (Ctrl-C in a terminal, or closing the generator), the
        part already yielded is stored as the model's turn, as the user saw it.
        """
        if not isinstance(text, str):
            raise TypeError(f"ChatSession.say/stream take a string; got {type(text).__name__}.")
        prompt = self.prompt(text)
        self.last_prompt = prompt
        # <bos> plus the prompt's tokens: the reply gets max_new_tokens on top.
        prompt_tokens = len(self.tokenizer.tokenize(prompt)) + 1
        self.messages.append({"role": "user", "content": text})
        pieces = []
        try:
            for piece in self.causal_lm.stream(
                prompt, max_length=prompt_tokens + self.max_new_tokens
            ):
                pieces.append(piece)
                yield piece
        finally:
            self.messages.append({"role": "model", "content": "".join(pieces)})

    def say(self, text):
        """The whole reply to `text`, as a string."""
        return "".join(self.stream(text))

    def reset(self):
        """Forgets every turn; the system text stays."""
        self.messages = []
        self.last_prompt = None

    def _history(self):
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + list(self.messages)
