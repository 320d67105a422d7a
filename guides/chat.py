# # Chatting with Gemma
#
# Run it: `KERAS_BACKEND=jax python guides/chat.py` (or tensorflow, torch).
#
# Gemma's instruction-tuned models ("-it" presets such as gemma2_instruct_2b_en) were trained
# on conversations written in a chat template: each turn is wrapped in `<start_of_turn>` and
# `<end_of_turn>` with the speaker's role, and the model answers after
# `<start_of_turn>model`. This guide builds those prompts, keeps a multi-turn history, and
# stops each answer at `<end_of_turn>`.
#
# It runs offline on Gemma 3 270M, which is a *pretrained* model: it continues text well but
# was not tuned to follow instructions, so its answers are weak. Swap in an instruction-tuned
# preset for real use (`KERAS_GEMMA_GUIDE_PRESET=gemma3_instruct_1b` once downloaded). In CI
# the variable names a tiny model.

import os

import keras_gemma

PRESET = os.environ.get("KERAS_GEMMA_GUIDE_PRESET", "gemma3_270m")
lm = keras_gemma.GemmaCausalLM.from_preset(PRESET, dtype="float32")
tokenizer = lm.preprocessor.tokenizer

# ## The chat template
#
# `apply_chat_template` turns a list of `{"role", "content"}` messages into the prompt text.
# Roles alternate "user" / "model" ("assistant" is accepted for "model"). Gemma has no system
# turn: a leading "system" message is folded into the first user turn, as Google's template
# does.
messages = [
    {"role": "system", "content": "Answer in one short sentence."},
    {"role": "user", "content": "What is the capital of France?"},
]
prompt = tokenizer.apply_chat_template(messages)
print(prompt)
assert prompt == (
    "<start_of_turn>user\nAnswer in one short sentence.\n\nWhat is the capital of France?"
    "<end_of_turn>\n<start_of_turn>model\n"
)

# ## One answer
#
# `generate` stops at `<eos>` and at `<end_of_turn>` by default ("auto" stop tokens), so the
# answer ends where the model closes its turn. `strip_prompt=True` returns only the answer.
answer = lm.generate(prompt, max_length=64, strip_prompt=True)
print("model:", answer)
assert isinstance(answer, str)


# ## Several turns
#
# `ChatSession` keeps the conversation: each `say` appends the user's text, formats the
# whole history with the template, generates until the model closes its turn, and stores
# the reply (without the `<end_of_turn>` marker) as the model's turn. The prompt grows with
# every turn; `max_new_tokens` bounds each reply. `stream` is the same, piece by piece.
chat = keras_gemma.ChatSession(lm, system="You are a helpful assistant.", max_new_tokens=32)
print("model:", chat.say("Give me a word that rhymes with 'cat'."))
print("model:", chat.say("And one more?"))
assert [m["role"] for m in chat.messages] == ["user", "model", "user", "model"]

# The second prompt held the first exchange: that is what "multi-turn" means here.
print(chat.last_prompt)
assert chat.last_prompt.count("<start_of_turn>user") == 2
assert chat.last_prompt.startswith("<start_of_turn>user\nYou are a helpful assistant.")

# `reset` forgets the turns (the system text stays): the next prompt holds one user turn.
chat.reset()
print("model:", chat.say("Hello again."))
assert chat.last_prompt.count("<start_of_turn>user") == 1

# ## Streaming an answer
#
# For a chat window, `stream` yields the answer as it is decoded and ends at `<end_of_turn>`
# (the stop token itself is not yielded). The command line does this for you:
# `keras-gemma generate "..."` streams to the terminal.
pieces = []
for piece in lm.stream(tokenizer.apply_chat_template([{"role": "user", "content": "Hi!"}]),
                       max_length=48):
    pieces.append(piece)
print("streamed:", "".join(pieces))
assert "<end_of_turn>" not in "".join(pieces)
