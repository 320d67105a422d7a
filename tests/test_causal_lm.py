"""GemmaCausalLM against transformers: greedy tokens, cached logits, and the model API.

The reference is transformers itself: tiny random Gemma, Gemma 2 and Gemma 3 models (made
as in test_huggingface.py, norms randomized too), saved with `save_pretrained`, loaded by
keras_gemma, and generated from with the same prompts.
"""


import keras
import numpy as np
import pytest
from conftest import tiny_config, to_numpy
from test_huggingface import _transformers_model

from keras_gemma import GemmaBackbone
from keras_gemma.causal_lm import GemmaCausalLM
from keras_gemma.generation import BeamSampler

MAX_LENGTH = 36  # > 20 new tokens for every row, and far past the window of 4
PROMPT_LENGTHS = (3, 7, 12)  # a batch whose prompts differ in length


def _prompts():
    rng = np.random.default_rng(11)
    token_ids = np.zeros((len(PROMPT_LENGTHS), MAX_LENGTH), "int32")
    padding_mask = np.zeros_like(token_ids, dtype=bool)
    for row, length in enumerate(PROMPT_LENGTHS):
        token_ids[row, :length] = rng.integers(4, 160, size=length)
        padding_mask[row, :length] = True
    return token_ids, padding_mask


@pytest.fixture(scope="module", params=["gemma", "gemma2", "gemma3"])
def reference(request, tmp_path_factory):
    """(transformers model, our GemmaCausalLM) with the same weights."""
    import torch

    model = _transformers_model(request.param, num_key_value_heads=2)
    # Re-randomized with a small embedding: with test_huggingface's scales the residual
    # stream is mostly the current token's embedding and greedy search repeats one token,
    # which would hide mistakes. These scales give varied continuations whose top-2 logit
    # margins (>= 1e-3) are far above float32 rounding.
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            std = 0.3 if "norm" in name else (0.05 if "embed" in name else 0.3)
            parameter.normal_(0.0, std)
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens
    model.generation_config.pad_token_id = 0
    directory = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(directory)
    backbone = GemmaBackbone.from_preset(str(directory), dtype="float32")
    return model, GemmaCausalLM(backbone), request.param


def _transformers_greedy(model, prompt, max_length, **options):
    import torch

    with torch.no_grad():
        output = model.generate(
            torch.tensor(prompt[None], dtype=torch.long),
            attention_mask=torch.ones((1, len(prompt)), dtype=torch.long),
            do_sample=False,
            max_new_tokens=max_length - len(prompt),
            **options,
        )
    return output[0].numpy()


def test_greedy_tokens_match_transformers(reference):
    model, lm, _ = reference
    token_ids, padding_mask = _prompts()
    output = lm.generate(
        {"token_ids": token_ids, "padding_mask": padding_mask}, stop_token_ids=None
    )
    assert output["token_ids"].shape == (len(PROMPT_LENGTHS), MAX_LENGTH)
    assert output["padding_mask"].all()  # no stop tokens: every position is filled
    for row, length in enumerate(PROMPT_LENGTHS):
        expected = _transformers_greedy(model, token_ids[row, :length], MAX_LENGTH)
        np.testing.assert_array_equal(output["token_ids"][row], expected)
    # Not a degenerate repetition of one token (which would hide mistakes).
    for row, length in enumerate(PROMPT_LENGTHS):
        assert len(set(output["token_ids"][row, length:].tolist())) > 3


def test_beam_search_matches_transformers(reference):
    model, lm, generation = reference
    if generation != "gemma2":  # one generation is enough here; each is one more compile
        pytest.skip("beam search is compared on Gemma 2 (sliding window and soft-caps)")
    token_ids, padding_mask = _prompts()
    width = 20
    lm.compile(sampler=BeamSampler(num_beams=3))
    try:
        output = lm.generate(
            {"token_ids": token_ids[:, :width], "padding_mask": padding_mask[:, :width]},
            stop_token_ids=None,
        )
    finally:
        lm.compile()
    for row, length in enumerate(PROMPT_LENGTHS):
        # Without a stop token every beam has the same length, so transformers' length
        # penalty does not reorder them.
        expected = _transformers_greedy(
            model, token_ids[row, :length], width, num_beams=3, early_stopping=False
        )
        np.testing.assert_array_equal(output["token_ids"][row], expected)


def test_cached_logits_equal_full_forward_at_every_step(reference):
    _, lm, _ = reference
    token_ids, padding_mask = _prompts()
    tokens = lm.generate(
        {"token_ids": token_ids, "padding_mask": padding_mask}, stop_token_ids=None
    )["token_ids"]
    full = to_numpy(lm({"token_ids": tokens, "padding_mask": np.ones_like(tokens)}))
    assert full.std() > 0.1
    call_with_cache = _compiled(lm.call_with_cache, lm)
    cache = lm.empty_cache(len(tokens), MAX_LENGTH)
    prefill = PROMPT_LENGTHS[0]
    logits, hidden, cache = call_with_cache(tokens[:, :prefill], cache, np.int32(0))
    assert tuple(hidden.shape) == (len(tokens), prefill, lm.backbone.hidden_dim)
    np.testing.assert_allclose(to_numpy(logits), full[:, :prefill], atol=1e-5, rtol=0)
    for index in range(prefill, MAX_LENGTH):
        logits, _, cache = call_with_cache(tokens[:, index : index + 1], cache, np.int32(index))
        np.testing.assert_allclose(
            to_numpy(logits)[:, 0], full[:, index], atol=1e-5, rtol=0, err_msg=f"step {index}"
        )


def _compiled(function, model):
    """`function` compiled with a dynamic cache index (eager op-by-op dispatch in JAX and TF
    takes longer than compiling); torch runs eagerly."""
    backend = keras.backend.backend()
    if backend == "jax":
        from keras_gemma.generation.generator import _jax_stateless_jit

        return _jax_stateless_jit(model, function)
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(function)
    return function


# The model API, on a small model of our own.

TINY = tiny_config(
    vocabulary_size=128,
    use_post_attention_norm=True,
    use_post_ffw_norm=True,
    use_sliding_window_attention=True,
    sliding_window_size=4,
    final_logit_soft_cap=30.0,
)


def _tiny_lm(dtype="float32", **overrides):
    backbone = GemmaBackbone(**{**TINY, **overrides}, dtype=dtype)
    rng = np.random.default_rng(0)
    for variable in backbone.weights:
        # A small embedding, so greedy continuations vary (see `reference` above).
        std = 0.3 if "norm" in variable.path else (0.05 if "embedding" in variable.path else 0.3)
        variable.assign(rng.normal(0, std, variable.shape).astype("float32"))
    return GemmaCausalLM(backbone)


def _corpus(batch=8, length=12):
    """Counting sequences mod 20: easy to learn, so a few steps must lower the loss."""
    starts = np.arange(batch)[:, None]
    ids = (starts + np.arange(length + 1)[None, :]) % 20 + 4
    x = {"token_ids": ids[:, :-1].astype("int32"), "padding_mask": np.ones((batch, length), bool)}
    return x, ids[:, 1:].astype("int32")


def test_call_gives_logits_and_compile_defaults():
    lm = _tiny_lm()
    x, _ = _corpus(2, 5)
    logits = to_numpy(lm(x))
    assert logits.shape == (2, 5, 128)
    assert isinstance(lm.optimizer, keras.optimizers.AdamW)
    assert type(lm.sampler).__name__ == "GreedySampler"
    assert isinstance(lm.loss, keras.losses.SparseCategoricalCrossentropy)


def test_fit_lowers_the_loss():
    lm = _tiny_lm()
    x, y = _corpus()
    lm.compile(optimizer=keras.optimizers.AdamW(learning_rate=1e-2))
    losses = lm.fit(x, y, batch_size=4, epochs=5, verbose=0).history["loss"]
    assert losses[-1] < 0.7 * losses[0], losses


def test_lora_trains_only_lora_weights_and_round_trips(tmp_path):
    lm = _tiny_lm()
    lm.backbone.enable_lora(rank=2)
    trainable = sorted(v.path for v in lm.trainable_variables)
    assert trainable
    assert all(p.rsplit("/", 1)[-1] in ("lora_kernel_a", "lora_kernel_b") for p in trainable)
    assert {p.split("/")[-2] for p in trainable} == {"query", "value"}
    frozen = {v.path: to_numpy(v).copy() for v in lm.weights if "lora" not in v.path}
    lora = {v.path: to_numpy(v).copy() for v in lm.weights if "lora" in v.path}
    x, y = _corpus()
    lm.compile(optimizer=keras.optimizers.AdamW(learning_rate=1e-2))
    lm.fit(x, y, batch_size=4, epochs=2, verbose=0)
    for variable in lm.weights:
        if variable.path in frozen:
            np.testing.assert_array_equal(to_numpy(variable), frozen[variable.path], variable.path)
    changed = [p for p, v in lora.items() if not np.array_equal(to_numpy(_by_path(lm, p)), v)]
    assert any(p.endswith("lora_kernel_b") for p in changed)  # b starts at zero
    # The LoRA weights alone save and load (both formats) into a model with the same base.
    expected = to_numpy(lm(x))
    other = _tiny_lm()
    other.backbone.enable_lora(rank=2)
    for name in ("adapter.lora.h5", "adapter.safetensors"):
        lm.backbone.save_lora_weights(tmp_path / name)
        for variable in other.weights:
            if "lora_kernel_b" in variable.path:
                variable.assign(np.zeros(variable.shape, "float32"))
        other.backbone.load_lora_weights(tmp_path / name)
        np.testing.assert_allclose(to_numpy(other(x)), expected, atol=1e-6)


def _by_path(model, path):
    return next(v for v in model.weights if v.path == path)


def test_int8_logits_within_tolerance_and_generate_works():
    lm = _tiny_lm()
    x, _ = _corpus(4, 12)
    reference = to_numpy(lm(x))
    lengths = np.array([[3], [5], [4], [6]])
    prompt = {"token_ids": x["token_ids"], "padding_mask": np.arange(12)[None, :] < lengths}
    lm.quantize("int8")
    assert "int8" in str(lm.backbone.transformer_layers[0].attention.query_dense.kernel.dtype)
    quantized = to_numpy(lm(x))
    # Tolerance, stated: Keras' int8 mode rounds each kernel per output channel, and each
    # matmul's input per token, to 255 levels. For Gaussian values of width 32 the largest
    # is ~2.5 sigma, so a step is ~0.02 sigma and rounding adds ~0.6% RMS relative error to
    # each operand, ~0.8% per product; ~16 products (2 blocks of 7, embedding both ways)
    # give ~3% of the logits' spread if the errors add in quadrature. We allow 6% RMS, and
    # require the argmax to survive wherever the float model's top-2 margin exceeds 4x the
    # RMS error (measured here: ~3% RMS, as estimated).
    scale = reference.std()
    rms_error = np.sqrt(np.mean((quantized - reference) ** 2))
    assert 0 < rms_error < 0.06 * scale, (rms_error, scale)
    top2 = np.sort(reference, axis=-1)[..., -2:]
    clear = (top2[..., 1] - top2[..., 0]) > 4 * rms_error
    assert clear.mean() > 0.3
    np.testing.assert_array_equal(quantized.argmax(-1)[clear], reference.argmax(-1)[clear])
    output = lm.generate(prompt, stop_token_ids=None)
    assert output["padding_mask"].all()
    in_prompt = prompt["padding_mask"]
    np.testing.assert_array_equal(output["token_ids"][in_prompt], x["token_ids"][in_prompt])


def test_save_and_load_keras_file(tmp_path):
    lm = _tiny_lm()
    lm.compile(sampler="top_k")
    x, _ = _corpus(2, 6)
    path = str(tmp_path / "lm.keras")
    lm.save(path)
    restored = keras.saving.load_model(path)
    assert isinstance(restored, GemmaCausalLM)
    assert isinstance(restored.backbone, GemmaBackbone)
    np.testing.assert_array_equal(to_numpy(restored(x)), to_numpy(lm(x)))
    assert type(restored.sampler).__name__ == "TopKSampler"
    rebuilt = GemmaCausalLM.from_config(lm.get_config())
    assert rebuilt.backbone.get_config() == lm.backbone.get_config()


@pytest.mark.parametrize("dtype", ["bfloat16", "mixed_bfloat16"])
def test_a_16_bit_model_keeps_16_bit_caches(dtype):
    # A Functional model ignores its `dtype` argument; the backbone must still report the
    # policy, or the KV caches sized from it are float32 (twice the memory of bfloat16 keys).
    lm = _tiny_lm(dtype=dtype)
    assert lm.backbone.compute_dtype == "bfloat16"
    cache = lm.empty_cache(2, 8)
    assert keras.backend.standardize_dtype(cache.dtype) == "bfloat16"
    _, _, cache = lm.call_with_cache(np.full((2, 3), 5, "int32"), cache, 0)
    assert keras.backend.standardize_dtype(cache.dtype) == "bfloat16"
    caches = lm.generator._empty_caches(2, 8)
    assert {keras.backend.standardize_dtype(c.dtype) for c in caches} == {"bfloat16"}


@pytest.fixture(scope="module")
def keras_hub_preset(sentencepiece_proto, tmp_path_factory):
    """A tiny KerasHub GemmaCausalLM and the preset directory it saved itself."""
    from keras_hub_models import keras_hub_causal_lm

    reference = keras_hub_causal_lm("gemma", sentencepiece_proto)
    directory = str(tmp_path_factory.mktemp("keras_hub_preset"))
    reference.save_to_preset(directory)
    return reference, directory


def test_from_preset_takes_a_preprocessor_as_keras_hub_does(keras_hub_preset):
    import keras_hub

    from keras_gemma import GemmaCausalLMPreprocessor

    reference, preset = keras_hub_preset
    preprocessor = GemmaCausalLMPreprocessor.from_preset(preset, sequence_length=32)
    ours = GemmaCausalLM.from_preset(preset, preprocessor=preprocessor)
    assert ours.preprocessor is preprocessor
    theirs = keras_hub.models.GemmaCausalLM.from_preset(
        preset, preprocessor=keras_hub.models.GemmaCausalLMPreprocessor.from_preset(
            preset, sequence_length=32
        )
    )
    prompts = ["The quick brown fox", "hello"]
    # max_length defaults to the preprocessor's sequence_length (32) on both.
    assert ours.generate(prompts, stop_token_ids=None) == list(
        theirs.generate(prompts, stop_token_ids=None)
    )
    assert ours.count_params() == theirs.count_params()


def test_from_preset_without_preprocessor_generates_on_token_ids(keras_hub_preset):
    import keras_hub

    reference, preset = keras_hub_preset
    ours = GemmaCausalLM.from_preset(preset, preprocessor=None)
    theirs = keras_hub.models.GemmaCausalLM.from_preset(preset, preprocessor=None)
    assert ours.preprocessor is None and theirs.preprocessor is None
    token_ids = np.array([[2, 651, 4320, 0, 0, 0, 0, 0]] * 2, dtype="int32")
    padding_mask = np.array([[1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0]], dtype="int32")
    token_ids = token_ids % 1000
    inputs = {"token_ids": token_ids, "padding_mask": padding_mask}
    expected = theirs.generate(inputs, stop_token_ids=None)
    actual = ours.generate(inputs, stop_token_ids=None)
    np.testing.assert_array_equal(to_numpy(actual["token_ids"]), to_numpy(expected["token_ids"]))
    np.testing.assert_array_equal(
        to_numpy(actual["padding_mask"]).astype(bool), to_numpy(expected["padding_mask"]).astype(bool)
    )


def test_compile_false_leaves_the_model_uncompiled_as_keras_hub_does(keras_hub_preset):
    import keras_hub

    reference, preset = keras_hub_preset
    theirs = keras_hub.models.GemmaCausalLM(reference.backbone, reference.preprocessor, compile=False)
    ours = GemmaCausalLM.from_preset(preset, compile=False)
    assert not theirs.compiled and not ours.compiled
    assert ours.generate("hello", max_length=8)  # generate works uncompiled (greedy)
    ours.compile(sampler="top_k")
    assert ours.compiled and type(ours.sampler).__name__ == "TopKSampler"
    assert GemmaCausalLM(ours.backbone, ours.preprocessor).compiled


def test_from_preset_refuses_arguments_it_would_ignore(keras_hub_preset):
    _, preset = keras_hub_preset
    backbone = GemmaBackbone.from_preset(preset)
    with pytest.raises(ValueError, match="pass dtype= and quantize= to the backbone"):
        GemmaCausalLM.from_preset(preset, backbone=backbone, dtype="bfloat16")
    with pytest.raises(ValueError, match="pass dtype= and quantize= to the backbone"):
        GemmaCausalLM.from_preset(preset, backbone=backbone, quantize="int8")
    with pytest.raises(ValueError, match="sequence_length= sets the preset's preprocessor"):
        GemmaCausalLM.from_preset(preset, preprocessor=None, sequence_length=16)
    with pytest.raises(TypeError):
        GemmaCausalLM.from_preset(preset, no_such_argument=1)


def test_jit_compile_auto_means_xla_for_float32_on_tensorflow_cpu():
    lm = GemmaCausalLM(GemmaBackbone(**tiny_config()))
    expected = keras.backend.backend() != "torch"
    assert lm.jit_compile is expected
    lm.compile(jit_compile=False)
    assert lm.jit_compile is False
    lm.compile()
    lm.quantize("int8")  # float32 copies of int8 kernels under XLA: TensorFlow drops XLA
    assert lm.jit_compile is (keras.backend.backend() == "jax")
    bfloat16 = GemmaCausalLM(GemmaBackbone(**tiny_config(), dtype="bfloat16"))
    assert bfloat16.jit_compile is (keras.backend.backend() == "jax")
