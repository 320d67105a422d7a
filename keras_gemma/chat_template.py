"""Gemma's chat turns: which roles may speak, in what order, and where a system text goes."""

_CHAT_ROLES = {"user": "user", "model": "model", "assistant": "model"}


def chat_turns(messages):
    """Validates chat messages; returns [(gemma_role, content)] with the system text folded in.

    Gemma has no system role: a leading system message is prepended to the first user turn.

    Example:
    >>> chat_turns([{"role": "system", "content": "Be brief."},
    ...             {"role": "user", "content": "Hi"}])
    [('user', 'Be brief.\\n\\nHi')]
    """
    where = "apply_chat_template"
    if not isinstance(messages, (list, tuple)) or not messages:
        raise TypeError(f"{where} expects a non-empty list of {{'role', 'content'}} dicts.")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise TypeError(f"{where}: message {i} must be a dict with 'role' and 'content'.")
        if not isinstance(m["content"], str):
            raise TypeError(f"{where}: message {i} content must be a str.")
        if m["role"] != "system" and m["role"] not in _CHAT_ROLES:
            raise ValueError(
                f"{where}: message {i} has unknown role {m['role']!r}; expected "
                "'system', 'user', 'model' or 'assistant'."
            )
    system = None
    if messages[0]["role"] == "system":
        system, messages = messages[0]["content"].strip(), messages[1:]
        if not messages or messages[0]["role"] != "user":
            raise ValueError(f"{where}: a system message must be followed by a user message.")
    turns = []
    for i, m in enumerate(messages):
        role = _CHAT_ROLES.get(m["role"])
        if role is None:
            raise ValueError(f"{where}: only the first message may have role 'system'.")
        if role != ("user" if i % 2 == 0 else "model"):
            raise ValueError(
                f"{where}: roles must alternate user/model starting with user; "
                f"message {i + (system is not None)} has role {m['role']!r}."
            )
        content = m["content"].strip()
        if i == 0 and system is not None:
            content = f"{system}\n\n{content}"
        turns.append((role, content))
    return turns
