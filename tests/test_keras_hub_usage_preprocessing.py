"""KerasHub usage of the tokenizer and preprocessor, import swapped, compared with KerasHub.

Each test builds a tiny model with KerasHub itself (its GemmaBackbone, GemmaTokenizer and
GemmaCausalLMPreprocessor on the session's SentencePiece model), saves it with KerasHub's
`save_to_preset`, loads it with keras_gemma, and runs the same user code on both:
- generation keeps the chat turn markers (issue 12, item 3);
- the preprocessor's outputs are backend tensors that mix with `keras.ops` (item 5);
- tokenizer and preprocessor `save_to_preset` next to a backbone (item 7).
"""

import json
import os

import keras
import numpy as np
import pytest
from conftest import tiny_config, to_numpy
from keras import ops
from sentencepiece_model import END_OF_TURN_ID
from sentencepiece_model import START_OF_TURN_ID

import keras_gemma
from keras_gemma.checkpoints import preset_parts

keras_hub = pytest.importorskip("keras_hub")

TINY = tiny_config(vocabulary_size=1000)
BOS, EOS, PAD = 2, 1, 0


def _randomize(model, seed=0):
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        std = 0.3 if "norm" in variable.path else 0.5
        variable.assign(rng.normal(0, std, variable.shape).astype(variable.dtype))


def _keras_hub_lm(proto, sequence_length=64, seed=0):
    backbone = keras_hub.models.GemmaBackbone(**TINY, dtype="float32")
    _randomize(backbone, seed)
    tokenizer = keras_hub.models.GemmaTokenizer(proto=proto)
    preprocessor = keras_hub.models.GemmaCausalLMPreprocessor(
        tokenizer, sequence_length=sequence_length
    )
    return keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=preprocessor)


@pytest.fixture(scope="module")
def models(sentencepiece_proto, tmp_path_factory):
    """(KerasHub's tiny GemmaCausalLM, the same preset loaded by keras_gemma)."""
    reference = _keras_hub_lm(sentencepiece_proto)
    preset = str(tmp_path_factory.mktemp("keras_hub_lm"))
    reference.save_to_preset(preset)
    return reference, keras_gemma.GemmaCausalLM.from_preset(preset)


class ChatState:
    """The chatbot guide's pattern: the transcript in Gemma's turn format, the reply cut out
    of the generated text with `response.replace(prompt, "")`."""

    def __init__(self, model):
        self.model = model
        self.history = []

    def send_message(self, message, max_length):
        self.history.append(f"<start_of_turn>user\n{message}<end_of_turn>\n")
        prompt = "".join(self.history) + "<start_of_turn>model\n"
        response = self.model.generate(prompt, max_length=max_length)
        result = response.replace(prompt, "")
        self.history.append(f"<start_of_turn>model\n{result}<end_of_turn>\n")
        return prompt, response, result


# Item 3: generate() keeps <start_of_turn> / <end_of_turn>.


def test_chat_generation_keeps_turn_markers_like_keras_hub(models):
    reference, ours = models
    reference.compile(sampler="greedy")
    ours.compile(sampler="greedy")
    theirs_chat, our_chat = ChatState(reference), ChatState(ours)
    for message, max_length in [("What is Keras?", 48), ("And the model?", 128)]:
        expected = theirs_chat.send_message(message, max_length)
        prompt, response, result = our_chat.send_message(message, max_length)
        assert (prompt, response, result) == expected
        # The prompt is found in the output, markers and all, and the reply is what follows.
        assert response.startswith(prompt) and "<end_of_turn>" in prompt
        assert result == response[len(prompt) :] and result
    assert our_chat.history == theirs_chat.history and len(our_chat.history) == 4
    # strip_prompt=True gives the reply alone, without the marker-laden prompt.
    last_prompt = "".join(our_chat.history[:3]) + "<start_of_turn>model\n"
    reply = ours.generate(last_prompt, max_length=128, strip_prompt=True)
    assert reply == reference.generate(last_prompt, max_length=128, strip_prompt=True)
    full = ours.generate(last_prompt, max_length=128)
    assert reply and full == last_prompt + reply


def test_stop_on_end_of_turn_shows_the_marker_like_keras_hub(sentencepiece_proto, tmp_path):
    # Make the tiny model answer <end_of_turn> mid-reply: find the greedy continuation, then
    # swap the (tied) embedding rows of one continuation token and <end_of_turn>. The
    # relabelled model emits <end_of_turn> where it emitted that token, and all else is equal
    # as long as neither id occurs before it.
    reference = _keras_hub_lm(sentencepiece_proto, seed=3)
    reference.compile(sampler="greedy")
    prompt = "<start_of_turn>model\nThe"
    packed = reference.preprocessor.generate_preprocess([prompt], sequence_length=24)
    ids = to_numpy(packed["token_ids"])
    prompt_length = int((ids != PAD).sum())
    reference.save_to_preset(str(tmp_path / "before"))
    plain = keras_gemma.GemmaCausalLM.from_preset(str(tmp_path / "before"))
    mask = ids != PAD
    out = to_numpy(plain.generate({"token_ids": ids, "padding_mask": mask}, stop_token_ids=None)[
        "token_ids"
    ])[0].tolist()
    swap_at = next(
        i
        for i in range(prompt_length + 2, len(out))
        if out[i] not in out[:i] + [PAD, BOS, EOS, START_OF_TURN_ID, END_OF_TURN_ID]
        and END_OF_TURN_ID not in out[:i]
    )
    table = to_numpy(reference.backbone.token_embedding.embeddings).copy()
    token = out[swap_at]
    table[[token, END_OF_TURN_ID]] = table[[END_OF_TURN_ID, token]]
    reference.backbone.token_embedding.embeddings.assign(table)
    reference.save_to_preset(str(tmp_path / "after"))
    ours = keras_gemma.GemmaCausalLM.from_preset(str(tmp_path / "after"))
    ours.compile(sampler="greedy")

    stop = [EOS, END_OF_TURN_ID]
    expected = reference.generate(prompt, max_length=24, stop_token_ids=stop)
    assert ours.generate(prompt, max_length=24, stop_token_ids=stop) == expected
    # Generation stopped at <end_of_turn>, which the text keeps, as KerasHub's does.
    assert expected.endswith("<end_of_turn>") and expected.startswith(prompt)
    assert len(expected) > len(prompt) + len("<end_of_turn>")
    # keras_gemma's "auto" stops there too (KerasHub's Gemma3CausalLM does; its GemmaCausalLM
    # stops on <eos> alone).
    assert ours.generate(prompt, max_length=24) == expected
    reply = ours.generate(prompt, max_length=24, strip_prompt=True)
    expected_reply = reference.generate(
        prompt, max_length=24, stop_token_ids=stop, strip_prompt=True
    )
    assert reply == expected_reply
    assert reply.endswith("<end_of_turn>")


def _keras_hub_preprocessors(proto):
    gemma = keras_hub.models.GemmaCausalLMPreprocessor(
        keras_hub.models.GemmaTokenizer(proto=proto), sequence_length=16
    )
    # Gemma 3, text only: without vision tokens its tokenizer has the same special tokens.
    gemma3 = keras_hub.models.Gemma3CausalLMPreprocessor(
        keras_hub.models.Gemma3Tokenizer(proto=proto, has_vision_tokens=False),
        sequence_length=16,
    )
    return {"gemma": gemma, "gemma3": gemma3}


@pytest.mark.parametrize("generation", ["gemma", "gemma3"])
def test_generate_postprocess_matches_keras_hub(sentencepiece_proto, generation):
    reference = _keras_hub_preprocessors(sentencepiece_proto)[generation]
    assert sorted(reference.tokenizer.special_token_ids) == [PAD, EOS, BOS]
    ours = keras_gemma.GemmaCausalLMPreprocessor(
        keras_gemma.GemmaTokenizer(proto=sentencepiece_proto), sequence_length=16
    )
    rng = np.random.default_rng(7)
    token_ids = rng.integers(4, 400, size=(4, 16)).astype("int32")
    # Every special and chat id, at the start, inside and at the end of rows.
    token_ids[0, :6] = [BOS, START_OF_TURN_ID, 300, END_OF_TURN_ID, EOS, PAD]
    token_ids[1, -4:] = [END_OF_TURN_ID, EOS, PAD, PAD]
    token_ids[2, 3:7] = [START_OF_TURN_ID, BOS, EOS, END_OF_TURN_ID]
    padding_mask = np.ones_like(token_ids, dtype=bool)
    padding_mask[3, 10:] = False  # a row cut short, as after a stop token
    token_ids[3, 9] = END_OF_TURN_ID
    inputs = {"token_ids": token_ids, "padding_mask": padding_mask}
    expected = reference.generate_postprocess(inputs)
    assert sum("<start_of_turn>" in text for text in expected) == 2
    assert sum("<end_of_turn>" in text for text in expected) == 4
    assert ours.generate_postprocess(inputs) == expected
    tensors = keras.tree.map_structure(ops.convert_to_tensor, inputs)
    assert ours.generate_postprocess(tensors) == reference.generate_postprocess(tensors)
    row = {"token_ids": token_ids[0], "padding_mask": padding_mask[0]}
    assert ours.generate_postprocess(row) == reference.generate_postprocess(row)
    # What generate_preprocess packs comes back as the text (the chat prompt included).
    prompt = "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    packed = ours.generate_preprocess([prompt, "plain"])
    assert ours.generate_postprocess(packed) == reference.generate_postprocess(packed)
    assert ours.generate_postprocess(packed) == [prompt, "plain"]


# Item 5: the preprocessor's outputs are backend tensors.


def test_preprocessor_outputs_mix_with_ops_and_model_calls(models):
    reference, ours = models
    texts = ["The quick brown fox.", "Hi"]
    expected_x, _, _ = reference.preprocessor(texts)
    x, y, sample_weight = ours.preprocessor(texts)
    for tensor in (x["token_ids"], x["padding_mask"], y, sample_weight):
        assert ops.is_tensor(tensor) and not isinstance(tensor, np.ndarray)
    assert type(x["token_ids"]) is type(expected_x["token_ids"])

    # The usage from the issue: a model call on the preprocessor's ids and ops.ones_like.
    ids = x["token_ids"]
    logits = ours({"token_ids": ids, "padding_mask": ops.ones_like(ids)})
    reference_ids = expected_x["token_ids"]
    expected = reference({"token_ids": reference_ids, "padding_mask": ops.ones_like(reference_ids)})
    np.testing.assert_allclose(to_numpy(logits), to_numpy(expected), atol=1e-4, rtol=0)
    # The preprocessed dict as it comes, and arithmetic on it with keras.ops.
    np.testing.assert_allclose(to_numpy(ours(x)), to_numpy(reference(expected_x)), atol=1e-4)
    lengths = ops.sum(ops.cast(x["padding_mask"], "int32"), axis=-1)
    expected_lengths = ops.sum(ops.cast(expected_x["padding_mask"], "int32"), axis=-1)
    assert to_numpy(lengths).tolist() == to_numpy(expected_lengths).tolist()

    # generate() on the packed ids, preprocessing detached (KerasHub's `preprocessor=None`).
    prompts = ours.preprocessor.generate_preprocess(texts, sequence_length=12)
    detached = keras_gemma.GemmaCausalLM(ours.backbone, preprocessor=None)
    theirs = keras_hub.models.GemmaCausalLM(backbone=reference.backbone, preprocessor=None)
    out = detached.generate(prompts, stop_token_ids=None)
    expected_out = theirs.generate(
        reference.preprocessor.generate_preprocess(texts, sequence_length=12), stop_token_ids=None
    )
    for key in ("token_ids", "padding_mask"):
        assert np.array_equal(to_numpy(out[key]), to_numpy(expected_out[key]))
    texts_out = ours.preprocessor.generate_postprocess(out)
    assert texts_out == reference.preprocessor.generate_postprocess(expected_out)


def test_fit_on_strings_still_gets_numpy(models):
    # fit() packs strings eagerly; the training data path converts the backend tensors.
    from keras_gemma.generation.training_data import preprocess_for_training

    _, ours = models
    x, y, weights, _ = preprocess_for_training(ours.preprocessor, ["a b", "c"], None, None, 2)
    assert all(isinstance(v, np.ndarray) for v in (x["token_ids"], x["padding_mask"], y, weights))
    assert x["token_ids"].shape == (2, 64) and x["token_ids"].dtype == np.int32


# Item 7: save_to_preset of the tokenizer and the preprocessor.


def _conversion_script(backbone, tokenizer, preset, tokenizer_first=False):
    # KerasHub's conversion script: the model, then the tokenizer, into one directory.
    if tokenizer_first:
        tokenizer.save_to_preset(preset)
        backbone.save_to_preset(preset)
    else:
        backbone.save_to_preset(preset)
        tokenizer.save_to_preset(preset)


@pytest.mark.parametrize("tokenizer_first", [False, True])
def test_backbone_and_tokenizer_saved_apart_load_fully(
    models, sentencepiece_proto, tmp_path, tokenizer_first
):
    reference, ours = models
    # The script with the import swapped, on the weights KerasHub's preset holds.
    backbone = keras_gemma.GemmaBackbone(**TINY, dtype="float32")
    backbone.set_weights(ours.backbone.get_weights())
    tokenizer = keras_gemma.GemmaTokenizer(proto=sentencepiece_proto)
    preset = str(tmp_path / "converted")
    _conversion_script(backbone, tokenizer, preset, tokenizer_first)
    assert sorted(os.listdir(preset)) == ["config.json", "model.safetensors", "tokenizer.model"]

    loaded = keras_gemma.GemmaCausalLM.from_preset(preset)
    assert loaded.preprocessor is not None
    assert loaded.preprocessor.tokenizer.proto == tokenizer.proto
    loaded.compile(sampler="greedy")
    reference.compile(sampler="greedy")
    prompt = "<start_of_turn>user\nHello<end_of_turn>\n<start_of_turn>model\n"
    assert loaded.generate(prompt, max_length=32) == reference.generate(prompt, max_length=32)
    assert keras_gemma.GemmaTokenizer.from_preset(preset)(prompt).tolist() == tokenizer(
        prompt
    ).tolist()


def test_tokenizer_alone_round_trips_and_matches_keras_hub(sentencepiece_proto, tmp_path):
    tokenizer = keras_gemma.GemmaTokenizer(proto=sentencepiece_proto)
    tokenizer.save_to_preset(str(tmp_path / "ours"))
    assert sorted(os.listdir(tmp_path / "ours")) == ["config.json", "tokenizer.model"]
    loaded = keras_gemma.GemmaTokenizer.from_preset(str(tmp_path / "ours"))
    assert loaded.proto == tokenizer.proto and loaded.sequence_length is None
    # The same usage on KerasHub's tokenizer (KerasHub itself loads a preset only once a
    # backbone's config.json is there), read back by keras_gemma.
    keras_hub.models.GemmaTokenizer(proto=sentencepiece_proto).save_to_preset(
        str(tmp_path / "theirs")
    )
    keras_hub.models.GemmaBackbone(**TINY).save_to_preset(str(tmp_path / "theirs"))
    assert keras_gemma.GemmaTokenizer.from_preset(str(tmp_path / "theirs")).proto == tokenizer.proto
    # A padded tokenizer keeps its length; an explicit argument wins.
    padded = keras_gemma.GemmaTokenizer(proto=sentencepiece_proto, sequence_length=5)
    padded.save_to_preset(str(tmp_path / "padded"))
    assert keras_gemma.GemmaTokenizer.from_preset(str(tmp_path / "padded")).sequence_length == 5
    again = keras_gemma.GemmaTokenizer.from_preset(str(tmp_path / "padded"), sequence_length=7)
    assert again.sequence_length == 7
    # A preprocessor built from it packs to its own length, not the tokenizer's.
    pre = keras_gemma.GemmaCausalLMPreprocessor.from_preset(str(tmp_path / "padded"))
    assert pre.tokenizer.sequence_length is None and pre.sequence_length == 1024
    # Only a tokenizer: no backbone to load, said plainly.
    with pytest.raises(ValueError, match="no backbone section"):
        keras_gemma.GemmaBackbone.from_preset(str(tmp_path / "ours"))


def test_preprocessor_save_to_preset_stores_its_settings(models, sentencepiece_proto, tmp_path):
    reference, ours = models
    preprocessor = keras_gemma.GemmaCausalLMPreprocessor(
        keras_gemma.GemmaTokenizer(proto=sentencepiece_proto),
        sequence_length=24,
        add_start_token=True,
        add_end_token=False,
    )
    preset = str(tmp_path / "preset")
    ours.backbone.save_to_preset(preset)
    preprocessor.save_to_preset(preset)
    loaded = keras_gemma.GemmaCausalLMPreprocessor.from_preset(preset)
    settings = (loaded.sequence_length, loaded.add_start_token, loaded.add_end_token)
    assert settings == (24, True, False)
    assert loaded.tokenizer.proto == preprocessor.tokenizer.proto
    lm = keras_gemma.GemmaCausalLM.from_preset(preset)
    assert lm.preprocessor.sequence_length == 24 and not lm.preprocessor.add_end_token
    # A backbone saved again over it keeps the preprocessor and the tokenizer.
    ours.backbone.save_to_preset(preset)
    assert keras_gemma.GemmaCausalLMPreprocessor.from_preset(preset).sequence_length == 24
    # KerasHub's preprocessor, saved the same way, gives keras_gemma the same settings.
    theirs = keras_hub.models.GemmaCausalLMPreprocessor(
        keras_hub.models.GemmaTokenizer(proto=sentencepiece_proto),
        sequence_length=24,
        add_end_token=False,
    )
    reference.backbone.save_to_preset(str(tmp_path / "theirs"))
    theirs.save_to_preset(str(tmp_path / "theirs"))
    from_theirs = keras_gemma.GemmaCausalLMPreprocessor.from_preset(str(tmp_path / "theirs"))
    assert (from_theirs.sequence_length, from_theirs.add_end_token) == (24, False)
    texts = ["a b", "The quick brown fox."]
    for a, b in zip(keras.tree.flatten(from_theirs(texts)), keras.tree.flatten(loaded(texts))):
        assert np.array_equal(to_numpy(a), to_numpy(b))


def test_a_model_saved_with_its_own_preprocessor_replaces_the_old_tokenizer(
    models, sentencepiece_proto, tmp_path
):
    _, ours = models
    preset = str(tmp_path / "preset")
    padded = keras_gemma.GemmaTokenizer(proto=sentencepiece_proto, sequence_length=5)
    padded.save_to_preset(preset)
    ours.save_to_preset(preset)  # writes its own tokenizer and preprocessor settings
    config = json.loads(open(os.path.join(preset, "config.json")).read())
    assert "tokenizer" not in config  # the old tokenizer's settings went with it
    assert config["preprocessor"]["config"]["sequence_length"] == 64
    assert keras_gemma.GemmaTokenizer.from_preset(preset).sequence_length is None


def test_writes_are_whole_or_not_at_all(models, sentencepiece_proto, tmp_path, monkeypatch):
    _, ours = models
    tokenizer = keras_gemma.GemmaTokenizer(proto=sentencepiece_proto)
    preset = str(tmp_path / "preset")
    ours.backbone.save_to_preset(preset)
    before = {name: open(os.path.join(preset, name), "rb").read() for name in os.listdir(preset)}

    # The rename that puts the new preset in place fails: the old preset stays whole (no new
    # tokenizer.model beside the old config.json), and nothing is left beside it.
    real_rename = os.rename

    def failing_rename(source, target):
        if ".partial-" in os.fspath(source):
            raise OSError("disk full")
        return real_rename(source, target)

    monkeypatch.setattr(preset_parts.os, "rename", failing_rename)
    with pytest.raises(OSError, match="disk full"):
        tokenizer.save_to_preset(preset)
    monkeypatch.undo()
    assert sorted(os.listdir(preset)) == sorted(before)
    assert all(open(os.path.join(preset, name), "rb").read() == data
               for name, data in before.items())
    assert sorted(os.listdir(tmp_path)) == ["preset"]
    # A new directory fails whole: nothing appears, nothing is left beside it.
    monkeypatch.setattr(preset_parts.os, "rename", failing_rename)
    with pytest.raises(OSError, match="disk full"):
        tokenizer.save_to_preset(str(tmp_path / "new"))
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["preset"]
    # Done again, it works, and the backbone is untouched.
    tokenizer.save_to_preset(preset)
    assert open(os.path.join(preset, "model.safetensors"), "rb").read() == before[
        "model.safetensors"
    ]
    assert keras_gemma.GemmaCausalLM.from_preset(preset).preprocessor is not None


def test_refuses_directories_that_are_not_keras_gemma_presets(sentencepiece_proto, tmp_path):
    tokenizer = keras_gemma.GemmaTokenizer(proto=sentencepiece_proto)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a preset: refusing"):
        tokenizer.save_to_preset(str(tmp_path / "notes"))
    assert os.listdir(tmp_path / "notes") == ["todo.txt"]
    keras_hub.models.GemmaTokenizer(proto=sentencepiece_proto).save_to_preset(
        str(tmp_path / "hub")
    )
    keras_hub.models.GemmaBackbone(**TINY).save_to_preset(str(tmp_path / "hub"))
    with pytest.raises(ValueError, match="KerasHub or transformers preset"):
        tokenizer.save_to_preset(str(tmp_path / "hub"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        tokenizer.save_to_preset(str(tmp_path / "file"))
    # An empty directory is a fine place for a new preset.
    (tmp_path / "empty").mkdir()
    tokenizer.save_to_preset(str(tmp_path / "empty"))
    assert keras_gemma.GemmaTokenizer.from_preset(str(tmp_path / "empty")).proto == tokenizer.proto
    # On loading, the tokenizer section names one of our classes and settings, or is refused.
    path = tmp_path / "empty" / "config.json"
    config = json.loads(path.read_text())
    for section, match in [
        ({"class_name": "Evil", "config": {}}, "'Evil' is not one of keras_gemma's"),
        ({"class_name": "GemmaTokenizer", "config": {"proto": "x"}}, r"unknown .* \['proto'\]"),
    ]:
        path.write_text(json.dumps({**config, "tokenizer": section}))
        with pytest.raises(ValueError, match=match):
            keras_gemma.GemmaTokenizer.from_preset(str(tmp_path / "empty"))
