"""Training examples with a loss mask: prompts/responses pairs and chat conversations.

One place for what the causal-LM preprocessors (Gemma 1/2 and Gemma 3) do with structured
training data. Each example becomes `<bos> ... <eos>` (ids), a mask of the real tokens and a
mask of the tokens the loss is taken on ("trained"); the preprocessor then shifts them into
inputs, labels and sample weights.

- `{"prompts": [...], "responses": [...]}`: the prompt is context, the response (and `<eos>`)
  is trained. Too long a pair is trimmed as KerasHub's Gemma 3 preprocessor trims it (one token
  to each part in turn, the prompt first), so the two agree token for token.
- A chat conversation, `[{"role": "user", "content": ...}, {"role": "model", "content": ...},
  ...]` (the form of `GemmaTokenizer.apply_chat_template`): it is rendered with Gemma's chat
  template and only the model turns' contents and their `<end_of_turn>` are trained, so the
  model learns to answer and to stop, not to write the user's turns. Too long a conversation
  keeps its beginning (and `<eos>`, trained when the last turn is the model's).

Example:
```python
ids, mask, trained = pack_pairs(tokenizer, ["Say hi:"], ["Hi!"], 16, [2], [1])
segments = chat_segments([{"role": "user", "content": "Hi"}, {"role": "model", "content": "Yo"}])
# [("<start_of_turn>user\\nHi<end_of_turn>\\n<start_of_turn>model\\n", False),
#  ("Yo<end_of_turn>\\n", True)]
```
"""

import math

import numpy as np

from keras_gemma.chat_template import chat_turns


def text_fields(x, owner, need_responses=True):
    """(prompts, responses or None) of a `{"prompts", "responses"}` dict, or a clear error."""
    if "prompts" not in x or (need_responses and "responses" not in x):
        wanted = '"prompts" and "responses"' if need_responses else '"prompts"'
        raise ValueError(
            f"{owner}: a dict input needs the keys {wanted} (prompt tokens are left out of the "
            f"loss); got the keys {sorted(x)}."
        )
    return x["prompts"], x.get("responses")


def is_chat_data(x):
    """Whether `x` is one conversation (a list of role/content dicts) or a list of them."""
    if not isinstance(x, (list, tuple)) or not x:
        return False
    first = x[0]
    if isinstance(first, (list, tuple)) and first:
        first = first[0]
    return isinstance(first, dict) and "role" in first


def round_robin(prompt_length, response_length, budget):
    """How many prompt and response tokens fit in `budget`, given out one at a time to each
    part in turn, the prompt first (what tensorflow_text's RoundRobinTrimmer keeps)."""
    kept_prompt = min(prompt_length, max(math.ceil(budget / 2), budget - response_length))
    return kept_prompt, min(response_length, budget - kept_prompt)


def _tokenized_rows(tokenizer, texts):
    rows = tokenizer.tokenize(texts)
    if isinstance(rows, np.ndarray):  # a single string
        return [rows.tolist()], True
    return [list(row) for row in rows], False


def _padded(rows, length, pad_id):
    """[(ids, trained)] -> (ids, mask, trained) arrays right-padded to `length`."""
    ids = np.full((len(rows), length), pad_id, dtype="int32")
    mask = np.zeros((len(rows), length), dtype=bool)
    trained = np.zeros((len(rows), length), dtype=bool)
    for i, (row, row_trained) in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = True
        trained[i, : len(row)] = row_trained
    return ids, mask, trained


def pack_pairs(tokenizer, prompts, responses, length, start, end):
    """`start + prompt + response + end`, right-padded to `length`: (ids, mask, trained).

    `trained` covers the response and the end token (KerasHub's segment ids for Gemma 3).
    `start`/`end` are lists of ids ([] or [id]). A single prompt string gives 1-D arrays.
    """
    prompt_rows, single = _tokenized_rows(tokenizer, prompts)
    response_rows, _ = _tokenized_rows(tokenizer, responses)
    if len(prompt_rows) != len(response_rows):
        raise ValueError(
            f"`prompts` and `responses` must have the same length; got {len(prompt_rows)} "
            f"prompts and {len(response_rows)} responses."
        )
    budget = max(length - len(start) - len(end), 0)
    rows = []
    for prompt, response in zip(prompt_rows, response_rows):
        kept_prompt, kept_response = round_robin(len(prompt), len(response), budget)
        context = start + prompt[:kept_prompt]
        answer = response[:kept_response] + end
        rows.append((context + answer, [False] * len(context) + [True] * len(answer)))
    packed = _padded(rows, length, tokenizer.pad_token_id)
    return tuple(array[0] for array in packed) if single else packed


def pack_pairs_tf(tokenizer, prompts, responses, length, start, end):
    """`pack_pairs` inside a tf.data / tf.function graph (tf tensors in and out)."""
    import tensorflow as tf
    import tensorflow_text as tf_text

    prompt_rows = tokenizer.tokenize(prompts)
    response_rows = tokenizer.tokenize(responses)
    single = not isinstance(prompt_rows, tf.RaggedTensor)
    if single:
        prompt_rows = tf.RaggedTensor.from_tensor(prompt_rows[tf.newaxis])
        response_rows = tf.RaggedTensor.from_tensor(response_rows[tf.newaxis])
    budget = max(length - len(start) - len(end), 0)
    prompt_rows, response_rows = tf_text.RoundRobinTrimmer(budget).trim(
        [prompt_rows, response_rows]
    )
    batch = prompt_rows.nrows()

    def column(value):
        return tf.RaggedTensor.from_tensor(tf.fill([batch, 1], value))

    parts = [column(v) for v in start] + [prompt_rows, response_rows]
    parts += [column(v) for v in end]
    context_parts = len(start) + 1
    in_answer = [tf.zeros_like(part, dtype="bool") for part in parts[:context_parts]]
    in_answer += [tf.ones_like(part, dtype="bool") for part in parts[context_parts:]]
    rows = tf.concat(parts, axis=1)
    shape = [None, length]
    ids = rows.to_tensor(default_value=tokenizer.pad_token_id, shape=shape)
    mask = tf.ones_like(rows, dtype="bool").to_tensor(default_value=False, shape=shape)
    trained = tf.concat(in_answer, axis=1).to_tensor(default_value=False, shape=shape)
    if single:
        return ids[0], mask[0], trained[0]
    return ids, mask, trained


def chat_segments(conversation):
    """A conversation as Gemma's chat template text, cut into (text, trained) pieces.

    The template and its checks are `GemmaTokenizer.apply_chat_template`'s (roles alternate
    user/model from a user turn, an optional leading system message joins the first user turn).
    A model turn's content and `<end_of_turn>\\n` are trained; its `<start_of_turn>model\\n`
    header and user turns are context.
    """
    segments = []
    for role, content in chat_turns(conversation):
        if role == "user":
            segments.append((f"<start_of_turn>user\n{content}<end_of_turn>\n", False))
        else:
            segments.append(("<start_of_turn>model\n", False))
            segments.append((f"{content}<end_of_turn>\n", True))
    return segments


def pack_chats(tokenizer, conversations, length, start, end):
    """Conversations -> (ids, mask, trained) right-padded to `length`.

    Each piece of `chat_segments` is tokenized on its own (pieces meet at turn markers and
    newlines, where SentencePiece would cut anyway); a conversation longer than `length` keeps
    its beginning and `end`. One conversation (a list of dicts) gives 1-D arrays.
    """
    if tokenizer.start_of_turn_id is None or tokenizer.end_of_turn_id is None:
        raise ValueError(
            "Chat training data needs a vocabulary with <start_of_turn> / <end_of_turn> "
            "pieces (an instruction-tuned Gemma tokenizer)."
        )
    single = isinstance(conversations[0], dict)
    if single:
        conversations = [conversations]
    rows = []
    keep = max(length - len(start) - len(end), 0)
    for conversation in conversations:
        segments = chat_segments(conversation)
        pieces, _ = _tokenized_rows(tokenizer, [text for text, _ in segments])
        ids = [i for piece in pieces for i in piece][:keep]
        trained = [t for piece, (_, t) in zip(pieces, segments) for _ in piece][:keep]
        # <eos> after a model turn is trained (the answer ends there); after a user turn not.
        end_trained = [segments[-1][1]] * len(end)
        rows.append((start + ids + end, [False] * len(start) + trained + end_trained))
    packed = _padded(rows, length, tokenizer.pad_token_id)
    return tuple(array[0] for array in packed) if single else packed
