"""export_to_transformers: transformers itself loads what we write, with the same numbers.

A tiny random Gemma 1, 2 and 3 causal LM (tests/export_models.py) is exported, loaded with
`AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` (no code of ours
runs there), and both sides run the same batch: logits within 1e-5 in float32 (the same
weights, float32 arithmetic in both; measured <= 4e-6) and the same greedy ids.
"""

import json
import os

import numpy as np
import pytest

pytest.importorskip("transformers")

import export_models  # noqa: E402
from conftest import to_numpy  # noqa: E402
from keras_gemma import GemmaBackbone  # noqa: E402
from keras_gemma.checkpoints.safetensors_io import read_safetensors  # noqa: E402
from keras_gemma.export import transformers_export  # noqa: E402
from keras_gemma.export.transformers_export import export_to_transformers  # noqa: E402


@pytest.fixture(scope="module", params=["gemma", "gemma2", "gemma3"])
def exported(request, sentencepiece_proto, tmp_path_factory):
    import torch
    import transformers

    lm = export_models.causal_lm(request.param, sentencepiece_proto)
    path = export_to_transformers(lm, tmp_path_factory.mktemp("hf") / request.param)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager").eval()
    return request.param, lm, path, model


def test_logits_match_transformers(exported):
    generation, lm, _, model = exported
    expected_class = {"gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
                      "gemma3": "Gemma3ForCausalLM"}[generation]
    assert type(model).__name__ == expected_class
    token_ids, padding_mask = export_models.batch()
    ours = export_models.logits(lm.backbone, token_ids, padding_mask)
    theirs = export_models.transformers_logits(model, token_ids, padding_mask)
    present = padding_mask.astype(bool)
    assert theirs[present].std() > 0.1  # not a comparison of near-zero tensors
    np.testing.assert_allclose(ours[present], theirs[present], atol=1e-5, rtol=0)


def _greedy_by_logits(backbone, prompt, new):
    """Greedy ids from full forward passes over one fixed-width array (no recompiles)."""
    width = prompt.shape[1] + new
    token_ids = np.zeros((len(prompt), width), "int32")
    token_ids[:, :prompt.shape[1]] = prompt
    for length in range(prompt.shape[1], width):
        mask = np.repeat((np.arange(width) < length).astype("int32")[None], len(prompt), axis=0)
        logits = export_models.logits(backbone, token_ids, mask)
        token_ids[:, length] = logits[:, length - 1].argmax(-1)
    return token_ids


def test_greedy_ids_match_transformers(exported):
    import torch

    generation, lm, _, model = exported
    # The width of export_models.batch(): JAX reuses the ops compiled for the logits test.
    prompt = np.array([[2, 17, 301, 45, 9], [2, 880, 3, 77, 512]], "int32")
    new = 6
    with torch.no_grad():
        theirs = model.generate(torch.tensor(prompt, dtype=torch.long), do_sample=False,
                                max_new_tokens=new, min_new_tokens=new).numpy()
    if generation == "gemma3":
        # Through generate() itself once (its KV cache and compiled loop cost a compile per
        # model; tests/test_generation.py shows every decode path gives the same tokens).
        width = prompt.shape[1] + new
        token_ids = np.zeros((2, width), "int32")
        token_ids[:, :prompt.shape[1]] = prompt
        mask = np.repeat((np.arange(width) < prompt.shape[1]).astype("int32")[None], 2, axis=0)
        ours = lm.generate({"token_ids": token_ids, "padding_mask": mask}, stop_token_ids=None)
        ours = np.asarray(ours["token_ids"])
    else:
        ours = _greedy_by_logits(lm.backbone, prompt, new)
    np.testing.assert_array_equal(ours, theirs)


def test_files_and_round_trip(exported):
    generation, lm, path, _ = exported
    assert sorted(os.listdir(path)) == sorted([
        "config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
        "tokenizer.model", "tokenizer_config.json"])
    assert not [name for name in os.listdir(os.path.dirname(path)) if ".partial-" in name]
    tensors = dict(read_safetensors(os.path.join(path, "model.safetensors")))
    assert "lm_head.weight" not in tensors  # tied, as transformers saves Gemma
    # Our own reader gives back the same architecture and the same weights.
    back = GemmaBackbone.from_preset(path, dtype="float32")
    config = lm.backbone.get_config()
    if config["query_pre_attn_scalar"] is None and generation != "gemma":
        config["query_pre_attn_scalar"] = config["head_dim"]  # made explicit on the way out
    assert back.get_config() == config
    for ours, theirs in zip(lm.backbone.weights, back.weights):
        np.testing.assert_array_equal(to_numpy(ours), to_numpy(theirs))
    with open(os.path.join(path, "generation_config.json")) as file:
        assert json.load(file)["eos_token_id"] == [1, 107]  # <eos>, <end_of_turn>


def test_tokenizer_loads_in_transformers(exported, sentencepiece_proto):
    import transformers
    from tokenizer_corpus import CORPUS

    generation, lm, path, _ = exported
    if generation != "gemma3":
        pytest.skip("the tokenizer files are the same for every generation: checked once")
    theirs = transformers.AutoTokenizer.from_pretrained(path)
    ours = lm.preprocessor.tokenizer
    assert theirs("Hello").input_ids[0] == 2  # <bos> added, as Gemma's tokenizer does
    assert theirs.convert_tokens_to_ids(["<start_of_turn>", "<end_of_turn>"]) == [106, 107]
    # Two known differences of transformers' Gemma tokenizer, not of these files: it matches
    # the control pieces (<bos>, <eos>...) written literally in text, where SentencePiece
    # never does, and it matches whitespace-run pieces before BPE, so a run longer than the
    # longest such piece splits differently.
    differ = []
    for text in CORPUS:
        if theirs(text, add_special_tokens=False).input_ids != list(np.asarray(ours(text))):
            differ.append(text)
    known = [t for t in differ if any(p in t for p in ("<bos>", "<eos>", "<pad>", "<unk>"))
             or " " * 9 in t]
    assert differ == known and len(differ) < 0.05 * len(CORPUS)
    text = "The quick brown fox"
    assert theirs.decode(theirs(text, add_special_tokens=False).input_ids) == text
    chat = [{"role": "system", "content": "Be brief. "}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Why?"}]
    expected = "<bos>" + ours.apply_chat_template(chat)
    assert theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == expected
    assert theirs.apply_chat_template(chat[1:2], tokenize=False, add_generation_prompt=False) == (
        "<bos><start_of_turn>user\nHi<end_of_turn>\n")
    assert theirs.decode(theirs("<start_of_turn>user", add_special_tokens=False).input_ids,
                         skip_special_tokens=True) == "user"


def test_backbone_with_tokenizer_in_bfloat16(sentencepiece_proto, tmp_path):
    import ml_dtypes

    lm = export_models.causal_lm("gemma", sentencepiece_proto)
    path = export_to_transformers(lm.backbone, tmp_path / "bf16",
                                  tokenizer=lm.preprocessor.tokenizer, dtype="bfloat16")
    with open(os.path.join(path, "config.json")) as file:
        assert json.load(file)["dtype"] == "bfloat16"
    tensors = dict(read_safetensors(os.path.join(path, "model.safetensors")))
    embedding = tensors["model.embed_tokens.weight"]
    assert embedding.dtype == ml_dtypes.bfloat16
    expected = to_numpy(lm.backbone.token_embedding.embeddings).astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(embedding, expected)
    assert os.path.exists(os.path.join(path, "tokenizer.model"))


def test_backbone_alone_writes_the_model_only(sentencepiece_proto, tmp_path):
    lm = export_models.causal_lm("gemma", sentencepiece_proto)
    path = export_to_transformers(lm.backbone, tmp_path / "model_only")
    assert sorted(os.listdir(path)) == ["config.json", "generation_config.json",
                                        "model.safetensors"]


def test_failure_leaves_nothing_and_other_directories_are_refused(
        sentencepiece_proto, tmp_path, monkeypatch):
    lm = export_models.causal_lm("gemma", sentencepiece_proto)
    target = tmp_path / "out"

    def broken(*args, **kwargs):
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(transformers_export, "write_safetensors", broken)
        with pytest.raises(OSError, match="disk full"):
            export_to_transformers(lm, target)
    assert os.listdir(tmp_path) == []  # neither the target nor a temporary sibling
    export_to_transformers(lm, target)
    export_to_transformers(lm, target)  # an earlier export is replaced
    assert sorted(os.listdir(tmp_path)) == ["out"]
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("mine")
    with pytest.raises(ValueError, match="refusing to overwrite"):
        export_to_transformers(lm, other)
    assert (other / "todo.txt").read_text() == "mine"


def test_architecture_transformers_cannot_express_is_named(sentencepiece_proto, tmp_path):
    lm = export_models.causal_lm("gemma", sentencepiece_proto, use_post_ffw_norm=True)
    with pytest.raises(ValueError, match="use_post_attention_norm"):
        export_to_transformers(lm, tmp_path / "x")
    assert not os.path.exists(tmp_path / "x")


def test_lora_is_merged_into_the_exported_kernels(sentencepiece_proto, tmp_path):
    import torch
    import transformers

    lm = export_models.causal_lm("gemma", sentencepiece_proto)
    lm.backbone.enable_lora(rank=2)
    rng = np.random.default_rng(3)
    for variable in lm.backbone.weights:
        if "lora_kernel" in variable.path:  # b starts at zero: give the adapter an effect
            variable.assign(rng.normal(0, 0.2, variable.shape).astype("float32"))
    path = export_to_transformers(lm, tmp_path / "lora")
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    token_ids, padding_mask = export_models.batch()
    present = padding_mask.astype(bool)
    ours = export_models.logits(lm.backbone, token_ids, padding_mask)[present]
    theirs = export_models.transformers_logits(model, token_ids, padding_mask)[present]
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)
