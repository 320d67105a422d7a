"""export_to_gguf: our GGUF loader and transformers' `gguf_file=` reader read what we write.

A tiny random Gemma 1, 2 and 3 causal LM (tests/export_models.py) is written in f16 and
q8_0 (and bf16 once). Tolerances, and why:

- Against transformers' reader of the same file: logits within 1e-4. Both dequantize the
  same stored values and compute in float32 (measured <= 5e-6), so this checks the names,
  layouts, norms (1 + w) and metadata independently. transformers rebuilds only part of the
  config from GGUF metadata (not query_pre_attn_scalar, soft-caps, RoPE scaling or the layer
  pattern; and no Gemma 1 at all), so the fields it does read are checked against ours and
  the rest of its config is passed in.
- Against the float32 model, per weight: the format's own rounding. f16 and bf16 round to
  nearest (relative error <= 2^-11 and 2^-8); Q8_0 stores blocks of 32 as int8 times a
  float16 scale d = absmax / 127, so each value is within d / 2 plus the scale's own rounding
  (127 * d * 2^-11): 0.6 d bounds both. Norms stay float32 (1 + w, exact to 1e-6).
- Against the float32 model, logits: a consequence of the above, bounded as a fraction of
  the largest logit: f16 1%, bf16 5%, q8_0 10% (measured 0.6%, 1.5%, 4.8% on these random,
  untrained weights, whose layers amplify perturbations more than a trained model's).
"""

import os

import numpy as np
import pytest

pytest.importorskip("gguf")
pytest.importorskip("transformers")

import export_models  # noqa: E402
from conftest import to_numpy  # noqa: E402
from keras_gemma import GemmaBackbone, GemmaTokenizer  # noqa: E402
from keras_gemma.checkpoints import gguf as gguf_loader  # noqa: E402
from keras_gemma.export import gguf_export  # noqa: E402
from keras_gemma.export.gguf_export import export_to_gguf  # noqa: E402
from keras_gemma.export.transformers_export import transformers_config  # noqa: E402

LOGIT_TOLERANCE = {"f16": 0.01, "bf16": 0.05, "q8_0": 0.1}
CASES = [(g, d) for g in ("gemma", "gemma2", "gemma3") for d in ("f16", "q8_0")]


@pytest.fixture(scope="module")
def files(sentencepiece_proto, tmp_path_factory):
    directory = tmp_path_factory.mktemp("gguf_export")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KERAS_GEMMA_CACHE", str(directory / "cache"))
        written = {}
        for generation in ("gemma", "gemma2", "gemma3"):
            lm = export_models.causal_lm(generation, sentencepiece_proto)
            for dtype in ("f16", "q8_0") + (("bf16",) if generation == "gemma3" else ()):
                path = export_to_gguf(lm, directory / f"{generation}-{dtype}.gguf", dtype=dtype)
                loaded = GemmaBackbone.from_preset(path, dtype="float32")  # our loader
                written[generation, dtype] = (lm, path, loaded)
        yield written


def _weight_bound(original, dtype, name):
    """The largest error the format's rounding allows, element by element."""
    if original.ndim == 1 or "norm" in name:
        return np.full_like(original, 1e-6)
    if dtype == "f16":
        return np.abs(original) * 2.0**-11 + 2.0**-25  # + half the subnormal step
    if dtype == "bf16":
        return np.abs(original) * 2.0**-8 + 1e-30
    blocks = original.reshape(-1, 32)
    scale = np.abs(blocks).max(axis=1, keepdims=True) / 127
    return np.broadcast_to(0.6 * scale, blocks.shape).reshape(original.shape)


@pytest.mark.parametrize("generation,dtype", CASES + [("gemma3", "bf16")])
def test_our_loader_reads_back_within_the_format_precision(files, generation, dtype):
    lm, path, loaded = files[generation, dtype]
    config, back = lm.backbone.get_config(), loaded.get_config()
    assert back["layer_norm_epsilon"] == pytest.approx(config["layer_norm_epsilon"])
    if config["query_pre_attn_scalar"] is None and generation != "gemma":
        config["query_pre_attn_scalar"] = config["head_dim"]
    ignored = ("layer_norm_epsilon",) + (("sliding_window_size",) if generation == "gemma" else ())
    assert {k: v for k, v in back.items() if k not in ignored} == {
        k: v for k, v in config.items() if k not in ignored}
    for ours, theirs in zip(lm.backbone.weights, loaded.weights):
        original, stored = to_numpy(ours), to_numpy(theirs)
        bound = _weight_bound(original, dtype, ours.path)
        assert np.all(np.abs(stored - original) <= bound), ours.path
    token_ids, padding_mask = export_models.batch()
    present = padding_mask.astype(bool)
    expected = export_models.logits(lm.backbone, token_ids, padding_mask)[present]
    actual = export_models.logits(loaded, token_ids, padding_mask)[present]
    assert np.abs(actual - expected).max() <= LOGIT_TOLERANCE[dtype] * np.abs(expected).max()
    if dtype != "f16":
        assert np.abs(actual - expected).max() > 0  # the file really is rounded


@pytest.mark.parametrize("generation,dtype", [c for c in CASES if c[0] != "gemma"])
def test_transformers_reader_matches_our_loader(files, generation, dtype):
    import torch
    import transformers

    lm, path, loaded = files[generation, dtype]
    directory, name = os.path.split(path)
    from_file = transformers.AutoConfig.from_pretrained(directory, gguf_file=name)
    config = transformers.AutoConfig.for_model(**transformers_config(lm.backbone))
    for key in ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "intermediate_size", "sliding_window",
                "vocab_size", "layer_types"):
        assert getattr(from_file, key) == getattr(config, key), key
    assert from_file.rms_norm_eps == pytest.approx(config.rms_norm_eps)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=name, config=config, dtype=torch.float32).eval()
    token_ids, padding_mask = export_models.batch()
    present = padding_mask.astype(bool)
    theirs = export_models.transformers_logits(model, token_ids, padding_mask)[present]
    ours = export_models.logits(loaded, token_ids, padding_mask)[present]
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def test_tokenizer_round_trips(files, sentencepiece_proto):
    import transformers
    from tokenizer_corpus import CORPUS

    lm, path, _ = files["gemma3", "q8_0"]
    original = lm.preprocessor.tokenizer
    rebuilt = GemmaTokenizer(proto=gguf_loader.tokenizer_file(path))  # our loader's rebuild
    assert rebuilt.get_vocabulary() == original.get_vocabulary()
    directory, name = os.path.split(path)
    theirs = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
    differ = []
    for text in CORPUS:
        ids = list(np.asarray(original(text)))
        assert list(np.asarray(rebuilt(text))) == ids
        if theirs(text, add_special_tokens=False).input_ids != ids:
            differ.append(text)
    # transformers' known differences (see test_transformers_export.py): literal control
    # pieces, and whitespace runs longer than the longest whitespace piece.
    known = [t for t in differ if any(p in t for p in ("<bos>", "<eos>", "<pad>", "<unk>"))
             or " " * 9 in t]
    assert differ == known and len(differ) < 0.05 * len(CORPUS)
    assert theirs("Hi").input_ids[0] == 2


def test_metadata_and_tensor_types(files):
    import gguf

    _, path, _ = files["gemma3", "q8_0"]
    reader = gguf.GGUFReader(path)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["token_embd.weight"] == "Q8_0" and types["blk.0.ffn_down.weight"] == "Q8_0"
    assert types["blk.0.attn_norm.weight"] == "F32"
    assert "output.weight" not in types  # tied
    field = reader.fields["gemma3.attention.sliding_window_pattern"]
    assert [bool(field.parts[i][0]) for i in field.data] == [True] * 5 + [False]


def test_errors_are_clear_and_leave_nothing(sentencepiece_proto, tmp_path, monkeypatch):
    lm = export_models.causal_lm("gemma2", sentencepiece_proto, query_pre_attn_scalar=20)
    target = tmp_path / "model.gguf"
    with pytest.raises(ValueError, match="scales queries by 20"):
        export_to_gguf(lm, target)
    with pytest.raises(ValueError, match="dtype must be one of"):
        export_to_gguf(lm, target, dtype="q4_k")
    with pytest.raises(ValueError, match="tokenizer="):
        export_to_gguf(lm.backbone, target)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    lm = export_models.causal_lm("gemma", sentencepiece_proto)
    monkeypatch.setattr(gguf_export, "_write_tokenizer", broken)
    with pytest.raises(OSError, match="disk full"):
        export_to_gguf(lm, target)
    assert os.listdir(tmp_path) == []  # neither the file nor a temporary sibling
