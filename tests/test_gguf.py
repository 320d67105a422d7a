"""GGUF files (llama.cpp's layout) load into GemmaBackbone and GemmaTokenizer.

Tiny random transformers models are written as GGUF by tests/gguf_files.py, in float32,
Q8_0 and a mix of every other supported type; keras_gemma's logits must match transformers'
on the weights `gguf` itself reads back from the same file.
"""

import os

import numpy as np
import pytest

pytest.importorskip("gguf")
pytest.importorskip("transformers")

import keras  # noqa: E402
from sentencepiece import sentencepiece_model_pb2  # noqa: E402

import gguf_files  # noqa: E402
from conftest import to_numpy  # noqa: E402
from keras_gemma import GemmaBackbone, GemmaTokenizer  # noqa: E402
from keras_gemma.checkpoints import gguf  # noqa: E402
from tokenizer_corpus import CORPUS  # noqa: E402

MIXED = {"token_embd.weight": "Q6_K", "blk.0.attn_q.weight": "F16",
         "blk.0.attn_k.weight": "BF16", "blk.0.attn_v.weight": "Q4_0",
         "blk.0.attn_output.weight": "Q4_1", "blk.0.ffn_gate.weight": "Q5_0",
         "blk.0.ffn_up.weight": "Q5_1", "blk.0.ffn_down.weight": "Q2_K",
         "blk.1.attn_q.weight": "Q3_K", "blk.1.attn_k.weight": "Q4_K",
         "blk.1.attn_v.weight": "Q5_K", "*": "Q8_0"}


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_GEMMA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def models():
    return {arch: gguf_files.transformers_model(arch) for arch in ("gemma", "gemma2", "gemma3")}


@pytest.fixture(scope="module")
def files(models, sentencepiece_proto, tmp_path_factory):
    with open(sentencepiece_proto, "rb") as file:
        proto = file.read()
    directory = tmp_path_factory.mktemp("gguf")
    written = {}
    # Every generation in float32 (the layout), the quantized types on Gemma 3 (and Gemma 2's
    # Q8_0 for the cache test).
    cases = [(arch, "f32", None) for arch in models] + [
        ("gemma3", "q8_0", {"*": "Q8_0"}), ("gemma3", "mixed", MIXED),
        ("gemma2", "q8_0", {"*": "Q8_0"}), ("gemma", "q8_0", {"*": "Q8_0"})]
    for arch, name, types in cases:
        path = directory / f"{arch}-{name}.gguf"
        written[arch, name] = gguf_files.write_gguf(path, models[arch], arch, proto, types)
    written["llama"] = gguf_files.write_gguf(directory / "llama.gguf", models["gemma"], "gemma",
                                             proto, architecture_name="llama")
    written["iq4_nl"] = gguf_files.write_gguf(directory / "iq4.gguf", models["gemma"], "gemma",
                                              proto, {"blk.1.ffn_up.weight": "IQ4_NL"})
    return written


def _batch():
    rng = np.random.default_rng(3)
    token_ids = rng.integers(4, gguf_files.VOCAB, size=(2, 12)).astype("int32")
    padding_mask = np.ones_like(token_ids)
    padding_mask[1, -3:] = 0
    token_ids[1, -3:] = 0
    return token_ids, padding_mask


def _logits(backbone, token_ids, padding_mask):
    hidden = backbone({"token_ids": token_ids, "padding_mask": padding_mask})
    return to_numpy(keras.ops.cast(backbone.token_embedding(hidden, reverse=True), "float32"))


@pytest.mark.parametrize("arch, kind", [("gemma", "f32"), ("gemma2", "f32"), ("gemma3", "f32"),
                                        ("gemma3", "q8_0"), ("gemma3", "mixed")])
def test_logits_match_transformers(files, models, arch, kind):
    path = files[arch, kind]
    token_ids, padding_mask = _batch()
    expected = gguf_files.reference_logits(models[arch], arch, path, token_ids, padding_mask)
    backbone = GemmaBackbone.from_preset(path)  # through the loader's .gguf dispatch
    ours = _logits(backbone, token_ids, padding_mask)
    valid = padding_mask.astype(bool)
    np.testing.assert_allclose(ours[valid], expected[valid], atol=1e-4, rtol=1e-4)


def test_float32_file_is_the_original_model(files, models):
    # No GGUF read on the reference side: the file holds exactly the model's weights.
    import torch

    token_ids, padding_mask = _batch()
    model = gguf_files.transformers_model("gemma3")
    with torch.no_grad():
        expected = model(input_ids=torch.tensor(token_ids, dtype=torch.long),
                         attention_mask=torch.tensor(padding_mask)).logits.numpy()
    ours = _logits(GemmaBackbone.from_preset(files["gemma3", "f32"]), token_ids, padding_mask)
    valid = padding_mask.astype(bool)
    np.testing.assert_allclose(ours[valid], expected[valid], atol=1e-4, rtol=1e-4)


def test_architecture_from_metadata(files):
    config = GemmaBackbone.from_preset(files["gemma3", "q8_0"], load_weights=False).get_config()
    assert config["use_query_key_norm"] and config["sliding_window_pattern"] == 6
    assert config["local_rope_max_wavelength"] == 10000.0
    assert config["global_rope_max_wavelength"] == 1e6
    assert config["global_rope_scaling_factor"] == 8.0
    assert config["query_pre_attn_scalar"] == gguf_files.HEAD_DIM
    config = gguf.backbone_arguments(gguf.open_gguf(files["gemma2", "f32"]))
    assert (config["attention_logit_soft_cap"], config["final_logit_soft_cap"]) == (4.0, 3.0)
    assert config["sliding_window_size"] == gguf_files.WINDOW
    assert config["sliding_window_pattern"] == 2
    config = gguf.backbone_arguments(gguf.open_gguf(files["gemma", "f32"]))
    assert "use_query_key_norm" not in config and config["intermediate_dim"] == 2 * gguf_files.FFN


def test_bfloat16_dtype(files):
    backbone = GemmaBackbone.from_preset(files["gemma", "q8_0"], dtype="bfloat16")
    assert {str(v.dtype) for v in backbone.weights} == {"bfloat16"}


def test_tokenizer_is_the_original_sentencepiece_model(files, sentencepiece_proto):
    rebuilt_path = gguf.tokenizer_file(files["gemma3", "f32"])
    original, rebuilt = (sentencepiece_model_pb2.ModelProto() for _ in range(2))
    with open(sentencepiece_proto, "rb") as file:
        original.ParseFromString(file.read())
    with open(rebuilt_path, "rb") as file:
        rebuilt.ParseFromString(file.read())
    # Piece for piece: text, score and type, llama.cpp's changes undone.
    assert [(p.piece, p.score, p.type) for p in rebuilt.pieces] == [
        (p.piece, p.score, p.type) for p in original.pieces
    ]
    for field in ("model_type", "byte_fallback", "split_digits", "unk_id", "bos_id", "eos_id",
                  "pad_id", "allow_whitespace_only_pieces", "treat_whitespace_as_suffix"):
        assert getattr(rebuilt.trainer_spec, field) == getattr(original.trainer_spec, field)
    for field in ("name", "add_dummy_prefix", "remove_extra_whitespaces", "escape_whitespaces"):
        assert getattr(rebuilt.normalizer_spec, field) == getattr(original.normalizer_spec, field)
    ours, theirs = GemmaTokenizer(proto=rebuilt_path), GemmaTokenizer(proto=sentencepiece_proto)
    for text in CORPUS:
        ids = to_numpy(theirs(text)).tolist()
        assert to_numpy(ours(text)).tolist() == ids, text
        assert ours.detokenize(ids) == theirs.detokenize(ids)


def test_conversion_is_cached(files, cache, capfd):
    path = files["gemma2", "q8_0"]
    first = gguf.convert(path)
    assert "converting gemma2-q8_0.gguf (first load only)" in capfd.readouterr().err
    assert first.startswith(str(cache)) and os.path.basename(first) == gguf.file_sha256(path)
    stamp = os.path.getmtime(os.path.join(first, "model.safetensors"))
    assert gguf.convert(path) == first
    GemmaBackbone.from_preset(path)
    GemmaTokenizer.from_preset(path)
    assert capfd.readouterr().err == ""  # nothing converted again
    assert os.path.getmtime(os.path.join(first, "model.safetensors")) == stamp
    assert gguf.tokenizer_file(path) == os.path.join(first, "tokenizer.model")
    assert gguf.preset_metadata(path)["stop_tokens"] == ["<eos>"]


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 this is a zip file, not a model" * 10)
    with pytest.raises(ValueError, match=r"is not a GGUF file: it starts with b'PK\\x03\\x04'"):
        GemmaBackbone.from_preset(str(path))


@pytest.mark.parametrize("fraction", [0.002, 0.5, 0.999])
def test_truncated_file(files, tmp_path, fraction):
    with open(files["gemma", "f32"], "rb") as file:
        data = file.read()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(ValueError, match="is truncated"):
        GemmaBackbone.from_preset(str(path))


def test_unsupported_architecture(files):
    with pytest.raises(ValueError, match=r"unsupported GGUF architecture 'llama': keras_gemma "
                                         r"reads gemma, gemma2, gemma3"):
        GemmaBackbone.from_preset(files["llama"])


def test_unsupported_quantization_type(files):
    with pytest.raises(ValueError, match=r"unsupported GGUF tensor type IQ4_NL \(tensor "
                                         r"'blk.1.ffn_up.weight'\); keras_gemma reads F32, F16, "
                                         r"BF16, Q8_0.*Q6_K"):
        GemmaBackbone.from_preset(files["iq4_nl"])


def test_protobuf_writer_handles_negative_and_large_values():
    from keras_gemma.checkpoints.sentencepiece_proto import encode_message

    proto = encode_message([(40, -1), (4, 300), (1, "x" * 200)])
    spec = sentencepiece_model_pb2.TrainerSpec()
    spec.ParseFromString(proto)
    assert (spec.unk_id, spec.vocab_size, spec.input) == (-1, 300, ["x" * 200])


class _Field:
    def __init__(self, value):
        self.value = value

    def contents(self):
        return self.value


class _Reader:
    def __init__(self, fields):
        self.fields = {key: _Field(value) for key, value in fields.items()}


@pytest.mark.parametrize("fields, expected", [
    ({"general.name": "Gemma 3 270m"}, False),
    ({"general.name": "Gemma 3 270m It"}, True),
    ({"general.name": "gemma-2-2b-it"}, True),
    ({"general.finetune": "instruct"}, True),
    ({"general.name": "Gemma Italian base"}, False),
])
def test_instruction_tuned_guess(fields, expected):
    # Instruction-tuned files also stop on <end_of_turn> (metadata of the converted preset).
    assert gguf._instruction_tuned(_Reader(fields)) is expected
