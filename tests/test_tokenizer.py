"""GemmaTokenizer: ids equal to independent tokenizers, both engines, round trips, errors."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import sentencepiece as spm
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from sentencepiece_model import END_OF_TURN_ID
from sentencepiece_model import START_OF_TURN_ID
from sentencepiece_model import VOCAB_SIZE
from sentencepiece_model import gemma_like_model_file
from tokenizer_corpus import CORPUS
from tokenizer_corpus import LATIN

from keras_gemma.tokenizer import GemmaTokenizer


@pytest.fixture(scope="module")
def tokenizer(sentencepiece_proto):
    return GemmaTokenizer(proto=sentencepiece_proto)


def _train(tmp_path, **overrides):
    """A throwaway model for the tests that need a vocabulary other than Gemma's."""
    path = str(tmp_path / "other.model")
    options = dict(
        sentence_iterator=iter(LATIN),
        model_prefix=str(tmp_path / "other"),
        vocab_size=500,
        model_type="BPE",
        byte_fallback=True,
        character_coverage=0.98,
        minloglevel=2,
        num_threads=1,
    )
    options.update(overrides)
    spm.SentencePieceTrainer.train(**options)
    return path


def test_special_ids_and_vocabulary(tokenizer):
    assert tokenizer.vocabulary_size() == VOCAB_SIZE
    assert (tokenizer.pad_token_id, tokenizer.end_token_id) == (0, 1)
    assert (tokenizer.start_token_id, tokenizer.unk_token_id) == (2, 3)
    assert tokenizer.start_of_turn_id == START_OF_TURN_ID == 106
    assert tokenizer.end_of_turn_id == END_OF_TURN_ID == 107
    # What generate_postprocess strips: padding, <eos>, <bos>; the turn markers stay.
    assert tokenizer.special_token_ids == [0, 1, 2]
    vocab = tokenizer.get_vocabulary()
    assert len(vocab) == VOCAB_SIZE and vocab[:4] == ["<pad>", "<eos>", "<bos>", "<unk>"]
    for i in (0, 2, 106, 500, VOCAB_SIZE - 1):
        assert tokenizer.token_to_id(tokenizer.id_to_token(i)) == i
    assert tokenizer.id_to_token(np.int64(107)) == "<end_of_turn>"
    assert tokenizer.token_to_id("no such piece") == tokenizer.unk_token_id


def test_output_types_and_shapes(sentencepiece_proto, tokenizer):
    one = tokenizer("hello world")
    assert isinstance(one, np.ndarray) and one.dtype == np.int32 and one.ndim == 1
    assert np.array_equal(tokenizer(b"hello world"), one)
    batch = tokenizer(["hello world", "", "a"])
    assert batch[0] == one.tolist() and batch[1] == [] and isinstance(batch[2][0], int)
    assert tokenizer(np.array(["hello world", "a"])) == [batch[0], batch[2]]
    assert tokenizer(np.array([b"hello world", b"a"], dtype=object)) == [batch[0], batch[2]]
    assert tokenizer(("a",)) == [batch[2]]
    assert tokenizer([]) == []
    # Layer.__call__ and tokenize() are the same thing.
    assert np.array_equal(tokenizer.tokenize("hello world"), one)

    padded = GemmaTokenizer(proto=sentencepiece_proto, sequence_length=4)
    dense = padded(["hello world", "", "a"])
    assert dense.dtype == np.int32 and dense.shape == (3, 4)
    assert dense[0].tolist() == one[:4].tolist()
    assert dense[1].tolist() == [0, 0, 0, 0]
    assert padded("a").shape == (4,) and padded([]).shape == (0, 4)


def test_detokenize_inputs(tokenizer):
    ids = tokenizer("hello world")
    assert tokenizer.detokenize(ids) == "hello world"
    assert tokenizer.detokenize(ids.tolist()) == "hello world"
    # Every backend's tensors come back as Python strings.
    assert tokenizer.detokenize(keras.ops.convert_to_tensor(ids)) == "hello world"
    batch = [tokenizer("ab").tolist(), tokenizer("").tolist()]
    assert tokenizer.detokenize(batch) == ["ab", ""]
    # Padding, <bos> and <eos> are control pieces: they decode to nothing.
    assert tokenizer.detokenize([2] + ids.tolist() + [1, 0, 0]) == "hello world"
    # The chat pieces are text.
    assert tokenizer.detokenize([106, 107]) == "<start_of_turn><end_of_turn>"


def test_ids_match_sentencepiece_and_round_trip_on_corpus(sentencepiece_proto, tokenizer):
    reference = spm.SentencePieceProcessor(model_file=sentencepiece_proto)
    ours = tokenizer(CORPUS)
    assert ours == reference.encode(CORPUS)
    assert tokenizer.detokenize(ours) == CORPUS
    assert all(np.array_equal(tokenizer(s), ids) for s, ids in zip(CORPUS[::17], ours[::17]))


def test_ids_match_keras_hub(sentencepiece_proto, tokenizer):
    keras_hub = pytest.importorskip("keras_hub")
    reference = keras_hub.models.GemmaTokenizer(proto=sentencepiece_proto)
    assert tokenizer(CORPUS) == [np.asarray(reference(s)).tolist() for s in CORPUS]
    ids = tokenizer(CORPUS)
    assert [reference.detokenize(row) for row in ids] == tokenizer.detokenize(ids)
    assert tokenizer.special_token_ids == reference.special_token_ids
    # Eager outputs of the same kinds as KerasHub's, on every backend: numpy for one string,
    # lists of Python ints for a batch, a 2-D numpy array once padded.
    padded = GemmaTokenizer(proto=sentencepiece_proto, sequence_length=6)
    padded_reference = keras_hub.models.GemmaTokenizer(proto=sentencepiece_proto, sequence_length=6)
    for ours, theirs in [(tokenizer, reference), (padded, padded_reference)]:
        for texts in ("hello world", ["hello world", "", "a"], np.array(["a", "bc"])):
            out, expected = ours(texts), theirs(texts)
            assert type(out) is type(expected)
            if isinstance(expected, np.ndarray):
                assert out.dtype == expected.dtype and np.array_equal(out, expected)
            else:
                assert out == expected and type(out[0][0]) is type(expected[0][0])


def _transformers_tokenizer(model_path):
    transformers = pytest.importorskip("transformers")
    return transformers.GemmaTokenizer.from_pretrained(os.path.dirname(model_path))


def _hf_ids(hf, text):
    # add_special_tokens=False: compare content ids (from a .model file transformers 5 adds no
    # <bos> anyway). split_special_tokens=True: SentencePiece never matches its control pieces
    # (<pad>, <eos>, <bos>, <unk>) in text, and neither do we; transformers does by default.
    return hf(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


# Two differences of transformers (5.24) from SentencePiece, theirs, not ours; each is pinned
# by test_transformers_quirks_are_what_we_say, and the exact comparison skips only the strings
# that can meet them (still >= 250 of the corpus):
# 1. Its converter registers SentencePiece's user-defined pieces as added tokens matched on the
#    raw text. A whitespace-run piece is stored as "▁▁..." and so never matches real spaces;
#    the run then goes through BPE merges, which can split it differently from SentencePiece's
#    greedy longest match ("a" + 5 spaces + "word": SentencePiece ▁▁▁▁ ▁w, transformers ▁▁ ▁▁▁ w).
# 2. Its GemmaTokenizer declares "<mask>" a special token, so split_special_tokens=True also
#    breaks up "<mask>", which SentencePiece matches as a user-defined piece (id 4).
def _transformers_quirk(text):
    return "  " in text or "<mask>" in text


def test_ids_match_transformers(sentencepiece_proto, tokenizer):
    hf = _transformers_tokenizer(sentencepiece_proto)
    assert hf("hi")["input_ids"][0] != tokenizer.start_token_id  # no <bos> from a .model file
    plain = [s for s in CORPUS if not _transformers_quirk(s)]
    assert len(plain) >= 250
    assert [_hf_ids(hf, s) for s in plain] == tokenizer(plain)
    for s in CORPUS:
        if _transformers_quirk(s):  # different ids, same text
            assert tokenizer.detokenize(_hf_ids(hf, s)) == s


def test_ids_match_transformers_without_whitespace_pieces(tmp_path_factory):
    # The same model without the whitespace-run pieces: transformers then agrees on every
    # string but "<mask>", which shows that quirk 1 above is the whole story for space runs.
    path = gemma_like_model_file(str(tmp_path_factory.mktemp("no_ws")), whitespace_pieces=False)
    ours = GemmaTokenizer(proto=path)
    hf = _transformers_tokenizer(path)
    texts = [s for s in CORPUS if "<mask>" not in s]
    assert [_hf_ids(hf, s) for s in texts] == ours(texts)


def test_transformers_quirks_are_what_we_say(sentencepiece_proto, tokenizer):
    hf = _transformers_tokenizer(sentencepiece_proto)
    text = "a" + " " * 5 + "word"
    pieces = [tokenizer.id_to_token(i) for i in tokenizer(text)]
    assert pieces[:3] == ["a", "▁▁▁▁", "▁w"]
    assert _hf_ids(hf, text) != tokenizer(text).tolist()
    assert tokenizer.detokenize(_hf_ids(hf, text)) == text
    assert tokenizer("<mask>").tolist() == [4]
    assert hf("<mask>", add_special_tokens=False)["input_ids"] == [4]
    assert _hf_ids(hf, "<mask>") != [4]


def test_graph_engine_matches_eager_engine(sentencepiece_proto, tokenizer):
    tf = pytest.importorskip("tensorflow")
    pytest.importorskip("tensorflow_text")
    eager = tokenizer(CORPUS)
    ds = tf.data.Dataset.from_tensor_slices(CORPUS).batch(64).map(tokenizer)
    graph = [row for batch in ds for row in batch.to_list()]
    assert graph == eager
    # Unbatched elements, and ids back to text, inside the graph.
    ds = tf.data.Dataset.from_tensor_slices(CORPUS).map(tokenizer.tokenize)
    assert [t.numpy().tolist() for t in ds] == eager
    ds = tf.data.Dataset.from_tensor_slices(CORPUS).batch(64).map(tokenizer)
    texts = [s.decode("utf-8") for b in ds.map(tokenizer.detokenize) for s in b.numpy()]
    assert texts == CORPUS
    # Padded output in a tf.function.
    padded = GemmaTokenizer(proto=sentencepiece_proto, sequence_length=8)
    dense = tf.function(padded)(tf.constant(CORPUS))
    assert isinstance(dense, tf.Tensor) and dense.shape == (len(CORPUS), 8)
    assert np.array_equal(dense.numpy(), padded(CORPUS))


def test_works_without_tensorflow(sentencepiece_proto, backend):
    # The eager engine must not need TensorFlow: run it where importing tensorflow fails.
    script = f"""
import sys
sys.modules["tensorflow"] = None  # makes `import tensorflow` raise ImportError
sys.modules["tensorflow_text"] = None
from keras_gemma.tokenizer import GemmaTokenizer
from keras_gemma.preprocessor import GemmaCausalLMPreprocessor
tokenizer = GemmaTokenizer(proto={sentencepiece_proto!r})
assert tokenizer.detokenize(tokenizer(["héllo 👋", ""])) == ["héllo 👋", ""]
pre = GemmaCausalLMPreprocessor(tokenizer, sequence_length=8)
x, y, w = pre(["a b"])
assert pre.generate_postprocess(pre.generate_preprocess(["a b"])) == ["a b"]
assert sys.modules["tensorflow"] is None
"""
    # The TensorFlow backend itself needs TensorFlow; check the others.
    env = dict(os.environ, KERAS_BACKEND="jax" if backend == "tensorflow" else backend)
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_tf_tensors_eagerly_give_numpy(tokenizer):
    tf = pytest.importorskip("tensorflow")
    assert tokenizer(tf.constant(["ab", "c"])) == tokenizer(["ab", "c"])
    assert tokenizer.detokenize(tf.constant(tokenizer("ab"))) == "ab"
    ragged = tf.ragged.constant([[400], []])
    assert tokenizer.detokenize(ragged) == [tokenizer.detokenize([400]), ""]


_TEXT = st.text(alphabet=st.characters(exclude_categories=("Cs",), exclude_characters="\u2581"))


# The autouse seed fixture is function-scoped; it does not matter to a tokenizer.
@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=_TEXT)
def test_round_trip_arbitrary_unicode(tokenizer, text):
    # Surrogates cannot be encoded as UTF-8. U+2581 is SentencePiece's space symbol: it reads
    # back as a space in every Gemma tokenizer (see the next test), so it is left out here.
    assert tokenizer.detokenize(tokenizer(text)) == text
    assert tokenizer.detokenize(tokenizer([text, text[::-1]])) == [text, text[::-1]]


def test_space_symbol_reads_back_as_space(tokenizer, sentencepiece_proto):
    reference = spm.SentencePieceProcessor(model_file=sentencepiece_proto)
    assert reference.decode(reference.encode("a\u2581b")) == "a b"
    assert tokenizer.detokenize(tokenizer("a\u2581b")) == "a b"


def test_chat_template(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": " Hi there \n"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ]
    assert tokenizer.apply_chat_template(messages) == (
        "<start_of_turn>user\nBe brief.\n\nHi there<end_of_turn>\n"
        "<start_of_turn>model\nHello.<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    one = [{"role": "user", "content": "Hi"}]
    assert tokenizer.apply_chat_template(one, add_generation_prompt=False) == (
        "<start_of_turn>user\nHi<end_of_turn>\n"
    )
    ids = tokenizer(tokenizer.apply_chat_template(one)).tolist()
    assert ids[0] == 106 and ids.count(106) == 2 and ids.count(107) == 1


@pytest.mark.parametrize(
    "messages, error, match",
    [
        ([{"role": "robot", "content": "x"}], ValueError, "unknown role 'robot'"),
        ([{"role": "model", "content": "x"}], ValueError, "alternate"),
        (
            [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
            ValueError,
            "alternate",
        ),
        (
            [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}],
            ValueError,
            "only the first message",
        ),
        ([{"role": "system", "content": "s"}], ValueError, "followed by a user message"),
        ([], TypeError, "non-empty list"),
        ([{"role": "user"}], TypeError, "'role' and 'content'"),
        ([{"role": "user", "content": 3}], TypeError, "content must be a str"),
    ],
)
def test_chat_template_errors(tokenizer, messages, error, match):
    with pytest.raises(error, match=match):
        tokenizer.apply_chat_template(messages)


def test_chat_template_needs_chat_pieces(tmp_path):
    plain = GemmaTokenizer(
        proto=_train(tmp_path, pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>",
                     eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>")
    )
    assert plain.start_of_turn_id is None and plain.end_of_turn_id is None
    assert plain.special_token_ids == [0, 1, 2]
    with pytest.raises(ValueError, match="no <start_of_turn>"):
        plain.apply_chat_template([{"role": "user", "content": "x"}])


def test_bad_model_files(tmp_path, sentencepiece_proto):
    with pytest.raises(ValueError, match="model file not found: '.*missing.model'"):
        GemmaTokenizer(proto=str(tmp_path / "missing.model"))
    corrupt = tmp_path / "corrupt.model"
    corrupt.write_bytes(b"this is not a protobuf")
    with pytest.raises(ValueError, match="not a valid SentencePiece model"):
        GemmaTokenizer(proto=str(corrupt))
    with open(sentencepiece_proto, "rb") as f:
        truncated = f.read()[:1000]
    with pytest.raises(ValueError, match="not a valid SentencePiece model"):
        GemmaTokenizer(proto=truncated)
    with pytest.raises(ValueError, match="empty SentencePiece model"):
        GemmaTokenizer(proto=b"")
    with pytest.raises(TypeError, match="`proto` must be a path"):
        GemmaTokenizer(proto=123)
    with pytest.raises(TypeError, match="`proto` is required"):
        GemmaTokenizer()
    # A SentencePiece model, but not a Gemma one (default pieces <unk>, <s>, </s>).
    with pytest.raises(ValueError, match="no '<pad>' piece"):
        GemmaTokenizer(proto=_train(tmp_path))
    with pytest.raises(ValueError, match="`sequence_length` must be a positive integer"):
        GemmaTokenizer(proto=sentencepiece_proto, sequence_length=0)


@pytest.mark.parametrize(
    "bad, error, match",
    [
        (5, TypeError, "expects a string.*Received: int"),
        (None, TypeError, "Received: NoneType"),
        (["ok", 3.5], TypeError, "Received: float"),
        (np.array([1, 2]), TypeError, "numpy array of int64"),
        ([["a"], ["b"]], TypeError, "a string or a 1-D batch of strings"),
        (b"\xff\xfe", ValueError, "not valid UTF-8"),
    ],
)
def test_tokenize_rejects_non_strings(tokenizer, bad, error, match):
    with pytest.raises(error, match=match):
        tokenizer(bad)


def test_detokenize_rejects_bad_ids(tokenizer):
    with pytest.raises(ValueError, match=r"token id 1000 is out of range .* 0\.\.999"):
        tokenizer.detokenize([5, 1000])
    with pytest.raises(ValueError, match="token id -1 is out of range"):
        tokenizer.detokenize(np.array([[5, -1]]))
    with pytest.raises(ValueError, match="out of range"):
        tokenizer.id_to_token(VOCAB_SIZE)
    with pytest.raises(TypeError, match="expects int ids, not float64"):
        tokenizer.detokenize(np.array([1.5]))
    with pytest.raises(TypeError, match="must be integers"):
        tokenizer.detokenize([1, "a"])
    with pytest.raises(TypeError, match="not a scalar"):
        tokenizer.detokenize(np.int32(4))
    with pytest.raises(TypeError, match="expects a str"):
        tokenizer.token_to_id(4)


def test_graph_detokenize_rejects_bad_ids(tokenizer):
    tf = pytest.importorskip("tensorflow")
    pytest.importorskip("tensorflow_text")
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"token ids must be in 0\.\.999"):
        tf.function(tokenizer.detokenize)(tf.constant([[5, 1000]]))
    with pytest.raises(TypeError, match="expects strings"):
        tf.function(tokenizer.tokenize)(tf.constant([1, 2]))


def test_config_round_trip(tmp_path, sentencepiece_proto, tokenizer):
    padded = GemmaTokenizer(proto=sentencepiece_proto, sequence_length=16, name="tok")
    config = json.loads(json.dumps(keras.saving.serialize_keras_object(padded)))
    assert config["registered_name"] == "keras_gemma>GemmaTokenizer"
    assert sentencepiece_proto not in json.dumps(config)  # the bytes, not the path
    restored = keras.saving.deserialize_keras_object(config)
    assert isinstance(restored, GemmaTokenizer) and restored.name == "tok"
    assert restored.sequence_length == 16 and restored.proto == padded.proto
    assert np.array_equal(restored(CORPUS), padded(CORPUS))
    again = GemmaTokenizer.from_config(tokenizer.get_config())
    assert again(CORPUS) == tokenizer(CORPUS)
    with pytest.raises(ValueError, match="expected `proto_base64`, got a path"):
        GemmaTokenizer.from_config({"proto": sentencepiece_proto})
    # The model file as presets store it.
    path = tokenizer.save_assets(str(tmp_path))
    assert path.endswith("tokenizer.model")
    assert GemmaTokenizer(proto=path)(CORPUS[:20]) == tokenizer(CORPUS[:20])
    other = GemmaTokenizer(proto=_train(tmp_path, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
                                        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
                                        unk_piece="<unk>"))
    other.load_assets(str(tmp_path))
    assert other.proto == tokenizer.proto
