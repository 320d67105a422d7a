"""The public Gemma guides, written for KerasHub, run on keras_gemma after changing the import.

Each guide below follows the calls of one public guide, step by step, as a function of the
`keras_hub` module it was written against. It runs twice: with KerasHub itself and with
`import keras_gemma as keras_hub`, the one-line change the README promises. The other
adaptations are the ones any offline run needs: a tiny preset that KerasHub built and saved
itself instead of a Kaggle download, a few inline examples instead of a downloaded dataset,
and shorter `max_length`s. Greedy text must be the same from both libraries (our
`stop_token_ids="auto"` also stops at `<end_of_turn>`, on purpose: where it does, KerasHub's
text must continue ours).
"""

import json
import os

import keras
import numpy as np
import pytest

import keras_gemma
from conftest import to_numpy
from keras_hub_models import keras_hub_causal_lm


@pytest.fixture(scope="module")
def preset(sentencepiece_proto, tmp_path_factory):
    """A tiny Gemma preset directory written by KerasHub (stands in for "gemma2_2b_en")."""
    directory = str(tmp_path_factory.mktemp("tiny_gemma_preset"))
    keras_hub_causal_lm("gemma", sentencepiece_proto, sequence_length=64).save_to_preset(directory)
    return directory


def assert_same_greedy_text(ours, theirs):
    if isinstance(ours, str):
        ours, theirs = [ours], [theirs]
    assert len(ours) == len(theirs)
    for mine, reference in zip(ours, theirs):
        if mine != reference:
            assert mine.endswith("<end_of_turn>") and reference.startswith(mine), (mine, reference)


# Guide: "Get started with Gemma using KerasHub" (ai.google.dev/gemma/docs/core/keras_inference).


def getting_started(keras_hub, preset):
    gemma_lm = keras_hub.models.GemmaCausalLM.from_preset(preset)
    gemma_lm.summary()
    greedy = [
        gemma_lm.generate("What is the meaning of life?", max_length=64),
        gemma_lm.generate("How does the brain work?", max_length=64),
        gemma_lm.generate(
            ["What is the meaning of life?", "How does the brain work?"], max_length=64
        ),
    ]
    sampler = keras_hub.samplers.TopKSampler(k=5, seed=2)
    gemma_lm.compile(sampler=sampler)
    sampled = gemma_lm.generate("What is the meaning of life?", max_length=64)
    return greedy, sampled


def test_getting_started_guide(preset):
    import keras_hub

    theirs, _ = getting_started(keras_hub, preset)
    ours, sampled = getting_started(keras_gemma, preset)
    assert_same_greedy_text(ours[0], theirs[0])
    assert_same_greedy_text(ours[1], theirs[1])
    assert_same_greedy_text(list(ours[2]), list(theirs[2]))
    assert sampled.startswith("What is the meaning of life?") and len(sampled) > 30


# Guide: "Fine-tune Gemma models in Keras using LoRA" (ai.google.dev/gemma/docs/core/lora_tuning).

TEMPLATE = "Instruction:\n{instruction}\n\nResponse:\n{response}"
EXAMPLES = [  # stands in for the databricks-dolly-15k download
    {"instruction": "Name a primary colour.", "response": "Red is a primary colour."},
    {"instruction": "What is the capital of France?", "response": "Paris."},
    {"instruction": "Give me a word that rhymes with cat.", "response": "Hat rhymes with cat."},
    {"instruction": "Is water wet?", "response": "Water makes things wet."},
]


def lora_tuning(keras_hub, preset):
    data = [TEMPLATE.format(**example) for example in EXAMPLES]
    gemma_lm = keras_hub.models.GemmaCausalLM.from_preset(preset)
    prompt = TEMPLATE.format(instruction="What should I do on a trip to Europe?", response="")
    sampler = keras_hub.samplers.TopKSampler(k=5, seed=2)
    gemma_lm.compile(sampler=sampler)
    before = gemma_lm.generate(prompt, max_length=64)
    gemma_lm.backbone.enable_lora(rank=4)
    gemma_lm.summary()
    # Limit the input sequence length to 256 (to control memory usage).
    gemma_lm.preprocessor.sequence_length = 256
    optimizer = keras.optimizers.AdamW(learning_rate=5e-5, weight_decay=0.01)
    optimizer.exclude_from_weight_decay(var_names=["bias", "scale"])
    gemma_lm.compile(
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        optimizer=optimizer,
        weighted_metrics=[keras.metrics.SparseCategoricalAccuracy()],
    )
    history = gemma_lm.fit(data, epochs=1, batch_size=1)
    gemma_lm.compile(sampler=sampler)
    after = gemma_lm.generate(prompt, max_length=64)
    return gemma_lm, history.history["loss"][-1], before, after


def test_lora_tuning_guide(preset):
    import keras_hub

    theirs, their_loss, _, _ = lora_tuning(keras_hub, preset)
    ours, our_loss, before, after = lora_tuning(keras_gemma, preset)
    assert before.startswith("Instruction:\nWhat should I do") and after.startswith("Instruction:")
    assert np.isfinite(our_loss) and abs(our_loss - their_loss) < 0.05 * their_loss
    # Trainable weights: the LoRA factors of every query and value projection, nothing else.
    trainable = {v.path.split("/", 1)[1] for v in ours.backbone.trainable_variables}
    assert trainable == {
        f"attention/{layer}/lora_kernel_{factor}" for layer in ("query", "value") for factor in "ab"
    }
    # Our kernels are stored (out, in), so each LoRA pair is the standard (peft) one,
    # rank * (in + out) weights; KerasHub's (in, out) einsum kernels factor per head instead.
    backbone = ours.backbone
    query_out = backbone.num_query_heads * backbone.head_dim
    value_out = backbone.num_key_value_heads * backbone.head_dim
    expected = backbone.num_layers * 4 * (2 * backbone.hidden_dim + query_out + value_out)
    assert sum(int(np.prod(v.shape)) for v in backbone.trainable_variables) == expected
    assert ours.count_params() == theirs.count_params() - sum(
        int(np.prod(v.shape)) for v in theirs.backbone.trainable_variables
    ) + expected


# Guide: "Building a chatbot with Gemma" (ai.google.dev/gemma/docs/gemma_chat).


def make_chat_state(max_length):
    class ChatState:
        """The guide's conversation holder: turn markers written by hand."""

        __START_TURN_USER__ = "<start_of_turn>user\n"
        __START_TURN_MODEL__ = "<start_of_turn>model\n"
        __END_TURN__ = "<end_of_turn>\n"

        def __init__(self, model, system=""):
            self.model = model
            self.system = system
            self.history = []

        def add_to_history_as_user(self, message):
            self.history.append(self.__START_TURN_USER__ + message + self.__END_TURN__)

        def add_to_history_as_model(self, message):
            self.history.append(self.__START_TURN_MODEL__ + message)

        def get_history(self):
            return "".join([*self.history])

        def get_full_prompt(self):
            prompt = self.get_history() + self.__START_TURN_MODEL__
            if len(self.system) > 0:
                prompt = self.system + "\n" + prompt
            return prompt

        def send_message(self, message):
            self.add_to_history_as_user(message)
            prompt = self.get_full_prompt()
            response = self.model.generate(prompt, max_length=max_length)
            result = response.replace(prompt, "")  # Extract only the new response
            self.add_to_history_as_model(result)
            return result

    return ChatState


def chatbot(keras_hub, preset):
    gemma_lm = keras_hub.models.GemmaCausalLM.from_preset(preset)
    chat = make_chat_state(max_length=256)(gemma_lm)
    first = chat.send_message("Tell me, in a few words, how to compute all prime numbers up to 1000?")
    second = chat.send_message("Now in Python! No numpy, please!")
    return first, second, chat.get_history()


def test_chatbot_guide(preset):
    import keras_hub

    their_first, their_second, _ = chatbot(keras_hub, preset)
    first, second, history = chatbot(keras_gemma, preset)
    assert "<start_of_turn>user" not in first  # replace() found the prompt in the response
    assert_same_greedy_text(first, their_first)
    assert history.startswith(
        "<start_of_turn>user\nTell me, in a few words, how to compute all prime numbers up to "
        "1000?<end_of_turn>\n<start_of_turn>model\n" + first + "<start_of_turn>user\nNow in Python!"
    )
    # A random model never ends its turn, so the second prompt outgrows max_length and is
    # truncated: the same on both sides, hence the same second reply.
    assert_same_greedy_text(second, their_second)


# Guide: "Upload a model to Kaggle / Hugging Face" (keras.io/guides/keras_hub/upload): fine-tune,
# save_to_preset, load the preset back; the upload itself needs the network.


def upload_guide(keras_hub, preset, preset_dir):
    gemma_lm = keras_hub.models.GemmaCausalLM.from_preset(preset)
    gemma_lm.backbone.enable_lora(rank=4)
    gemma_lm.fit([TEMPLATE.format(**example) for example in EXAMPLES], epochs=1, batch_size=2)
    before = gemma_lm.generate("The quick brown fox", max_length=32)
    gemma_lm.save_to_preset(preset_dir)
    reloaded = keras_hub.models.GemmaCausalLM.from_preset(preset_dir)
    return before, reloaded.generate("The quick brown fox", max_length=32), reloaded


def test_upload_guide_saves_and_reloads(preset, tmp_path):
    text, reloaded_text, reloaded = upload_guide(keras_gemma, preset, str(tmp_path / "tuned"))
    assert reloaded_text == text
    config = json.loads((tmp_path / "tuned" / "config.json").read_text())
    assert config["keras_gemma_format"] >= 3
    # The tuned preset is a whole model: the LoRA update is in the saved kernels.
    original = keras_gemma.models.GemmaCausalLM.from_preset(preset)
    query = "decoder_block_0/attention/query/kernel"
    tuned = {v.path: v for v in reloaded.backbone.weights}[query]
    untuned = {v.path: v for v in original.backbone.weights}[query]
    assert np.abs(to_numpy(tuned) - to_numpy(untuned)).max() > 0
    assert sorted(os.listdir(tmp_path)) == ["tuned"]  # nothing half-written beside it


# Guide: "CodeGemma quickstart" (ai.google.dev/gemma/docs/codegemma/keras_quickstart):
# fill-in-the-middle completion that stops at any FIM piece.


@pytest.fixture(scope="module")
def code_preset(tmp_path_factory):
    """A tiny preset whose vocabulary has CodeGemma's FIM pieces (stands in for code_gemma_2b_en)."""
    from sentencepiece_model import gemma_like_model_file

    proto = gemma_like_model_file(str(tmp_path_factory.mktemp("fim_spm")), fim_pieces=True)
    directory = str(tmp_path_factory.mktemp("tiny_code_gemma"))
    keras_hub_causal_lm("gemma", proto, sequence_length=64, seed=4).save_to_preset(directory)
    return directory


def codegemma_quickstart(keras_hub, preset):
    gemma_lm_2b = keras_hub.models.GemmaCausalLM.from_preset(preset)
    BEFORE_CURSOR = "<|fim_prefix|>"
    AFTER_CURSOR = "<|fim_suffix|>"
    AT_CURSOR = "<|fim_middle|>"
    FILE_SEPARATOR = "<|file_separator|>"
    END_TOKEN = gemma_lm_2b.preprocessor.tokenizer.end_token
    stop_tokens = (BEFORE_CURSOR, AFTER_CURSOR, AT_CURSOR, FILE_SEPARATOR, END_TOKEN)
    stop_token_ids = tuple(gemma_lm_2b.preprocessor.tokenizer.token_to_id(x) for x in stop_tokens)

    def format_completion_prompt(before, after):
        return f"{BEFORE_CURSOR}{before}{AFTER_CURSOR}{after}{AT_CURSOR}"

    before = "import "
    after = """if __name__ == "__main__":\n    sys.exit(0)"""
    prompt = format_completion_prompt(before, after)
    return stop_token_ids, prompt, gemma_lm_2b.generate(
        prompt, stop_token_ids=stop_token_ids, max_length=128
    )


def test_codegemma_quickstart_guide(code_preset):
    import keras_hub

    their_ids, _, theirs = codegemma_quickstart(keras_hub, code_preset)
    stop_token_ids, prompt, ours = codegemma_quickstart(keras_gemma, code_preset)
    assert stop_token_ids == their_ids == (67, 69, 68, 70, 1)
    assert ours == theirs  # explicit stop ids: the same stopping rule in both
    assert ours.startswith(prompt)
