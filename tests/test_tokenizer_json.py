"""Gemma's SentencePiece model rebuilt from the tokenizer.json transformers saves.

The tiny Gemma-like model (tests/sentencepiece_model.py) goes through transformers
(.model -> tokenizer.json, as transformers 5 saves it, without a tokenizer.model) and back;
the rebuilt model must be the original piece for piece and encode every text the same.
"""

import copy
import json
import os
import warnings

import pytest
import sentencepiece as spm
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from sentencepiece import sentencepiece_model_pb2
from tokenizer_corpus import CORPUS

from keras_gemma.checkpoints.tokenizer_json import sentencepiece_proto_from_tokenizer_json
from keras_gemma.tokenizer import GemmaTokenizer

NORMAL = sentencepiece_model_pb2.ModelProto.SentencePiece.NORMAL


@pytest.fixture(autouse=True)
def _seed():
    # Overrides conftest's per-test Keras seeding: nothing here is random, and
    # keras.utils.set_random_seed imports TensorFlow (seconds) on every backend.
    yield


@pytest.fixture(scope="module")
def saved(sentencepiece_proto, tmp_path_factory):
    """(transformers tokenizer, directory its save_pretrained wrote)."""
    transformers = pytest.importorskip("transformers")
    # As tests/test_tokenizer.py does. (transformers 5.24's GemmaTokenizer(vocab_file=...)
    # ignores the file and builds a 5-token vocabulary.)
    hf = transformers.GemmaTokenizer.from_pretrained(os.path.dirname(sentencepiece_proto))
    directory = str(tmp_path_factory.mktemp("hf_tokenizer"))
    hf.save_pretrained(directory)
    if int(transformers.__version__.split(".")[0]) >= 5:
        assert sorted(os.listdir(directory)) == ["tokenizer.json", "tokenizer_config.json"]
    return hf, directory


@pytest.fixture(scope="module")
def tokenizer_json(saved):
    with open(os.path.join(saved[1], "tokenizer.json"), encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def rebuilt(saved):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # transformers' merges fit piece scores exactly
        return sentencepiece_proto_from_tokenizer_json(os.path.join(saved[1], "tokenizer.json"))


@pytest.fixture(scope="module")
def rebuilt_sp(rebuilt):
    return spm.SentencePieceProcessor(model_proto=rebuilt)


@pytest.fixture(scope="module")
def original(sentencepiece_proto):
    return spm.SentencePieceProcessor(model_file=sentencepiece_proto)


def _parse(proto):
    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(proto)
    return model


def test_rebuilt_model_is_the_original(sentencepiece_proto, rebuilt):
    with open(sentencepiece_proto, "rb") as f:
        before = _parse(f.read())
    after = _parse(rebuilt)
    assert [(p.piece, p.type) for p in after.pieces] == [(p.piece, p.type) for p in before.pieces]
    # Scores may differ; their order over NORMAL pieces (the BPE merge order) may not.
    def order(model):
        normal = [p for p in model.pieces if p.type == NORMAL]
        return [p.piece for p in sorted(normal, key=lambda p: -p.score)]

    assert order(after) == order(before)
    for name in ("model_type", "vocab_size", "byte_fallback", "split_digits", "unk_id",
                 "bos_id", "eos_id", "pad_id", "unk_piece", "bos_piece", "eos_piece",
                 "pad_piece", "allow_whitespace_only_pieces", "user_defined_symbols"):
        assert getattr(after.trainer_spec, name) == getattr(before.trainer_spec, name), name
    for name in ("name", "precompiled_charsmap", "add_dummy_prefix", "remove_extra_whitespaces",
                 "escape_whitespaces", "normalization_rule_tsv"):
        assert getattr(after.normalizer_spec, name) == getattr(before.normalizer_spec, name), name
    assert after.normalizer_spec.name == "identity"
    assert not after.normalizer_spec.add_dummy_prefix
    assert not after.normalizer_spec.remove_extra_whitespaces


def test_ids_match_original_on_corpus(tmp_path, rebuilt, original):
    ours = GemmaTokenizer(proto=rebuilt)
    expected = original.encode(CORPUS)
    assert ours(CORPUS) == expected
    assert ours.detokenize(expected) == CORPUS
    assert (ours.start_of_turn_id, ours.end_of_turn_id) == (106, 107)
    # The bytes as a tokenizer.model file, as a preset stores it.
    path = tmp_path / "tokenizer.model"
    path.write_bytes(rebuilt)
    assert GemmaTokenizer(proto=str(path))(CORPUS[::7]) == expected[::7]


def _hf_ids(hf, text):
    # As in tests/test_tokenizer.py: content ids only, and SentencePiece's rule that control
    # pieces written in text are not matched.
    return hf(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def _transformers_quirk(text):
    # The two differences of transformers from SentencePiece that tests/test_tokenizer.py
    # documents and pins: whitespace-run pieces never match real spaces, and "<mask>" counts as
    # a special token that split_special_tokens breaks up.
    return "  " in text or "<mask>" in text


def test_ids_match_transformers(saved, rebuilt):
    hf, _ = saved
    ours = GemmaTokenizer(proto=rebuilt)
    plain = [s for s in CORPUS if not _transformers_quirk(s)]
    assert len(plain) >= 250
    assert ours(plain) == [_hf_ids(hf, s) for s in plain]
    # Where transformers differs from SentencePiece, the rebuilt model sides with SentencePiece.
    quirky = [s for s in CORPUS if _transformers_quirk(s)]
    assert any(ours(s).tolist() != _hf_ids(hf, s) for s in quirky)


_SNIPPETS = [
    "<start_of_turn>", "<end_of_turn>", "<mask>", "<unused7>", "[@BOS@]", "<pad>", "<bos>",
    "<eos>", "<unk>", "<0x41>", " ", "  ", "     ", "\n", "\n\n\n\n", "\t\t\t", "\u2581",
    "the", " the", "token", " model", "keras", "0123", "ab", "ünï", "日本", "🙂",
]
_TEXT = st.lists(
    st.one_of(
        st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=8),
        st.text(alphabet="abcdefghilmnorstuwy .,\n\t", max_size=12),
        st.sampled_from(_SNIPPETS),
    ),
    max_size=8,
).map("".join)


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=_TEXT)
def test_ids_match_original_on_random_text(rebuilt_sp, original, text):
    assert rebuilt_sp.encode(text) == original.encode(text)


def test_inputs_and_layouts(saved, tokenizer_json, rebuilt):
    # A directory, a dict and a path give the same bytes.
    assert sentencepiece_proto_from_tokenizer_json(saved[1]) == rebuilt
    assert sentencepiece_proto_from_tokenizer_json(tokenizer_json) == rebuilt
    # Older files: merges as "a b" strings, no model type, no pre-tokenizer.
    old = copy.deepcopy(tokenizer_json)
    old["model"]["merges"] = [" ".join(pair) for pair in old["model"]["merges"]]
    del old["model"]["type"]
    old["pre_tokenizer"] = None
    assert sentencepiece_proto_from_tokenizer_json(old) == rebuilt
    # Spaces written as "▁" by a Metaspace pre-tokenizer that adds no prefix, not a normalizer.
    meta = copy.deepcopy(tokenizer_json)
    meta["normalizer"] = None
    meta["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581",
                             "prepend_scheme": "never", "split": False}
    assert sentencepiece_proto_from_tokenizer_json(meta) == rebuilt
    # An added token past the vocabulary (Gemma 3's <image_soft_token>) is not a piece.
    extra = copy.deepcopy(tokenizer_json)
    size = len(extra["model"]["vocab"])
    extra["added_tokens"].append({"id": size, "content": "<image_soft_token>", "special": True})
    assert sentencepiece_proto_from_tokenizer_json(extra) == rebuilt


def test_protobuf_written_by_hand_is_what_protobuf_writes(rebuilt):
    # keras_gemma writes the ModelProto itself (sentencepiece_proto.py); protobuf, parsing
    # and re-serializing it, gives back the same bytes.
    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(rebuilt)
    assert model.SerializeToString() == rebuilt


def _edited(tokenizer_json, edit):
    data = copy.deepcopy(tokenizer_json)
    edit(data)
    return data


def _rename(data, old, new):
    vocab = data["model"]["vocab"]
    vocab[new] = vocab.pop(old)
    for token in data["added_tokens"]:
        if token["content"] == old:
            token["content"] = new


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda d: d["model"].update(type="Unigram"), "BPE model; this one is 'Unigram'"),
        (lambda d: d["model"].update(byte_fallback=False), "no byte fallback"),
        (lambda d: d.pop("model"), "no `model`"),
        (lambda d: _rename(d, "<pad>", "<PAD>"), "no <pad> piece"),
        (lambda d: _rename(d, "<eos>", "</s>"), "no <eos> piece"),
        (lambda d: _rename(d, "<bos>", "<s>"), "no <bos> piece"),
        (lambda d: _rename(d, "<unk>", "<UNK>"), "no <unk> piece"),
        (lambda d: _rename(d, "<0x41>", "<0x4l>"), "the vocabulary has 255"),
        (lambda d: d["model"]["vocab"].update({"x": 5000}), "without gaps"),
        (lambda d: d["added_tokens"][5].update(id=6), "added token '\\[@BOS@\\]' has id 6"),
        (lambda d: d["model"]["merges"].append(["a", "zz"]), "'zz', which is not in the"),
        (lambda d: d["model"].update(end_of_word_suffix="</w>"), "`end_of_word_suffix`"),
        (
            lambda d: d.update(normalizer={"type": "Sequence", "normalizers": [
                {"type": "Prepend", "prepend": "\u2581"}, d["normalizer"]]}),
            "normalizer 'Prepend'",
        ),
        (lambda d: d.update(normalizer=None, pre_tokenizer=None), "does so 0 times"),
        (lambda d: d.update(normalizer=None), "pre-tokenizer 'Split'"),
        (
            lambda d: d.update(pre_tokenizer={"type": "ByteLevel", "add_prefix_space": False}),
            "pre-tokenizer 'ByteLevel'",
        ),
    ],
)
def test_refuses_what_is_not_a_gemma_tokenizer(tokenizer_json, edit, match):
    with pytest.raises(ValueError, match=match):
        sentencepiece_proto_from_tokenizer_json(_edited(tokenizer_json, edit))


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="tokenizer.json not found: '.*tokenizer.json'"):
        sentencepiece_proto_from_tokenizer_json(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        sentencepiece_proto_from_tokenizer_json(tmp_path / "tokenizer.json")
    with pytest.raises(TypeError, match="Received: int"):
        sentencepiece_proto_from_tokenizer_json(3)


def _move_to_end(merges, pair):
    merges.remove(pair)
    merges.append(pair)


@pytest.mark.parametrize(
    "edit, match",
    [
        # tokenizers then never builds "▁an" from "▁a" + "n"; SentencePiece would.
        (lambda m: m.remove(["\u2581a", "n"]), "no merge \\('▁a', 'n'\\) creates '▁an'"),
        # tokenizers then builds "▁an" from "▁" + "an" last; one score cannot say both.
        (lambda m: _move_to_end(m, ["\u2581", "an"]), "creating '▁an' are not next to each other"),
    ],
)
def test_warns_when_merges_do_not_fit_piece_scores(tokenizer_json, original, edit, match):
    # The model is still written (here still the original: "▁an" keeps its first merge).
    data = _edited(tokenizer_json, lambda d: edit(d["model"]["merges"]))
    with pytest.warns(UserWarning, match=match):
        proto = sentencepiece_proto_from_tokenizer_json(data)
    rebuilt_sp = spm.SentencePieceProcessor(model_proto=proto)
    assert rebuilt_sp.encode(CORPUS) == original.encode(CORPUS)
