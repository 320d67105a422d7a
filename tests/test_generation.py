"""GemmaCausalLM.generate() and stream(): buckets, stop tokens, strings, streaming."""

import keras
import numpy as np
import pytest
from conftest import to_numpy
from test_causal_lm import _tiny_lm

from keras_gemma.generation.greedy_sampler import GreedySampler
from keras_gemma.generation.text_stream import TextStream
from keras_gemma.layers.decode_matmul import xla_runs_on_cpu


def _prompt(lengths, width, seed=0):
    rng = np.random.default_rng(seed)
    token_ids = np.zeros((len(lengths), width), "int32")
    padding_mask = np.zeros_like(token_ids, dtype=bool)
    for row, length in enumerate(lengths):
        token_ids[row, :length] = rng.integers(4, 128, size=length)
        padding_mask[row, :length] = True
    return {"token_ids": token_ids, "padding_mask": padding_mask}


def _greedy_is_self_consistent(lm, output, prompt_mask):
    """Each generated token is the argmax of a full (uncached) forward pass at its position."""
    tokens = output["token_ids"]
    logits = to_numpy(lm({"token_ids": tokens, "padding_mask": np.ones_like(tokens)}))
    generated = output["padding_mask"] & ~prompt_mask
    rows, positions = np.nonzero(generated)
    np.testing.assert_array_equal(tokens[rows, positions], logits[rows, positions - 1].argmax(-1))


@pytest.fixture(scope="module")
def lm():
    return _tiny_lm()


def test_new_prompt_length_or_max_length_in_a_bucket_does_not_compile_again(lm):
    first = lm.generate(_prompt((3, 5), 20), stop_token_ids=None)
    _greedy_is_self_consistent(lm, first, _prompt((3, 5), 20)["padding_mask"])
    traces = lm.generator.trace_count
    assert traces >= 1
    # Other prompt lengths (prefill bucket 16) and max_length (width bucket 32).
    for lengths, width in (((4, 9), 28), ((6, 2), 32), ((11, 7), 25)):
        output = lm.generate(_prompt(lengths, width, seed=width), stop_token_ids=None)
        assert output["token_ids"].shape == (2, width)
    assert lm.generator.trace_count == traces
    # A new width bucket compiles once more.
    lm.generate(_prompt((3, 5), 40), stop_token_ids=None)
    assert lm.generator.trace_count == traces + 1


def test_python_driven_loop_matches_the_compiled_loop(lm, monkeypatch):
    """The loop in Python around a compiled step (torch; JAX with bfloat16 weights) gives
    the compiled loop's tokens, stop tokens included."""
    from keras_gemma.generation.generator import Generator

    prompt = _prompt((3, 6), 30, seed=5)
    free = lm.generate(prompt, stop_token_ids=None)
    stop = int(free["token_ids"][0, 5])
    stopped = lm.generate(prompt, stop_token_ids=[stop])
    monkeypatch.setattr(Generator, "_steps_from_python", lambda self: True)
    lm.generator.reset()
    for expected, stop_ids in ((free, None), (stopped, [stop])):
        actual = lm.generate(prompt, stop_token_ids=stop_ids)
        np.testing.assert_array_equal(actual["token_ids"], expected["token_ids"])
        np.testing.assert_array_equal(actual["padding_mask"], expected["padding_mask"])
    lm.generator.reset()


def test_bfloat16_weights_decode_from_python_on_jax():
    bf16 = _tiny_lm(dtype="bfloat16")
    backend = keras.backend.backend()
    expected = backend == "torch" or (backend == "jax" and xla_runs_on_cpu())
    assert bf16.generator._steps_from_python() == expected
    output = bf16.generate(_prompt((3, 5), 20), stop_token_ids=None)
    assert output["padding_mask"][:, :20].all()


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_weights_decode_from_python_on_jax(mode):
    """int8 and int4 weights decode a step per call on JAX's CPU (one loop hoisted their
    float32 conversions: more memory and slower). They decode what the same model gives in
    one loop."""
    from keras_gemma.generation.generator import Generator

    quantized = _tiny_lm()
    quantized.quantize(mode)
    backend = keras.backend.backend()
    expected = backend == "torch" or (backend == "jax" and xla_runs_on_cpu())
    assert quantized.generator._steps_from_python() == expected
    prompt = _prompt((3, 5), 20)
    output = quantized.generate(prompt, stop_token_ids=None)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Generator, "_steps_from_python", lambda self: not expected)
        quantized.generator.reset()
        other = quantized.generate(prompt, stop_token_ids=None)
    np.testing.assert_array_equal(output["token_ids"], other["token_ids"])


@pytest.mark.skipif(
    keras.backend.backend() != "jax" or not xla_runs_on_cpu(), reason="JAX on a CPU only"
)
def test_int4_steps_read_kernels_dequantized_once_per_call(monkeypatch):
    """int4 on JAX's CPU: generate() (one row and several: one program a step, or a block
    per call) and stream() run every int4 projection with the kernel dequantized for the
    call, and decode what the one-loop program decodes."""
    from keras_gemma.generation.generator import Generator
    from keras_gemma.layers import int4_decode_kernels

    quantized = _tiny_lm()
    quantized.quantize("int4")
    int4_layers = int4_decode_kernels.eligible_layers(quantized.backbone)
    assert len(int4_layers) == 7 * quantized.backbone.num_layers
    looked_up = []
    kernel_for = int4_decode_kernels.kernel_for
    monkeypatch.setattr(int4_decode_kernels, "kernel_for",
                        lambda layer: looked_up.append(kernel_for(layer)) or looked_up[-1])
    one_row, two_rows = _prompt((4,), 20, seed=1), _prompt((3, 5), 20, seed=2)
    outputs = [quantized.generate(prompt, stop_token_ids=None) for prompt in (one_row, two_rows)]
    assert looked_up and all(kernel is not None for kernel in looked_up)
    looked_up.clear()
    streamed = list(quantized.generator.stream(
        one_row["token_ids"], one_row["padding_mask"], GreedySampler()
    ))
    assert looked_up and all(kernel is not None for kernel in looked_up)
    monkeypatch.setattr(Generator, "_steps_from_python", lambda self: False)
    quantized.generator.reset()
    for prompt, output in zip((one_row, two_rows), outputs):
        expected = quantized.generate(prompt, stop_token_ids=None)
        np.testing.assert_array_equal(output["token_ids"], expected["token_ids"])
    np.testing.assert_array_equal(streamed, outputs[0]["token_ids"][0, 4:4 + len(streamed)])


def test_an_accelerator_keeps_one_compiled_loop_for_16_bit_weights(monkeypatch):
    # The Python-driven loop works around XLA's CPU dot; with an accelerator JAX compiles
    # the whole loop again, and decode_matmul uses the plain product.
    import keras_gemma.generation.generator as generator_module
    import keras_gemma.layers.decode_matmul as decode_matmul_module

    monkeypatch.setattr(generator_module, "xla_runs_on_cpu", lambda: False)
    monkeypatch.setattr(decode_matmul_module, "xla_runs_on_cpu", lambda: False)
    bf16 = _tiny_lm(dtype="bfloat16")
    assert bf16.generator._steps_from_python() == (keras.backend.backend() == "torch")
    output = bf16.generate(_prompt((3, 5), 20), stop_token_ids=None)
    assert output["padding_mask"][:, :20].all()


def test_stop_tokens_stop_rows_independently(lm):
    prompt = _prompt((3, 6), 30, seed=3)
    free = lm.generate(prompt, stop_token_ids=None)["token_ids"]
    # A stop token that row 0 produces (not first), preferably one that row 1 never does.
    generated0 = free[0, 3:].tolist()
    generated1 = free[1, 6:].tolist()
    candidates = [t for t in generated0[1:] if t not in generated0[:1]]
    stop = next((t for t in candidates if t not in generated1), candidates[0])
    output = lm.generate(prompt, stop_token_ids=[stop])
    ids, mask = output["token_ids"], output["padding_mask"]
    end0 = 3 + generated0.index(stop)  # the position of row 0's first stop token
    assert ids[0, end0] == stop
    np.testing.assert_array_equal(ids[0, : end0 + 1], free[0, : end0 + 1])
    assert mask[0, : end0 + 1].all() and not mask[0, end0 + 1 :].any()
    assert (ids[0, end0 + 1 :] == 0).all()  # padded after the stop
    if stop in generated1:
        end1 = 6 + generated1.index(stop)
        np.testing.assert_array_equal(ids[1, : end1 + 1], free[1, : end1 + 1])
        assert mask[1, : end1 + 1].all() and not mask[1, end1 + 1 :].any()
    else:
        assert mask[1].all()
        np.testing.assert_array_equal(ids[1], free[1])  # row 1 ran on, unaffected


def test_strip_prompt(lm):
    prompt = _prompt((3, 6), 20, seed=4)
    full = lm.generate(prompt, stop_token_ids=None)
    stripped = lm.generate(prompt, stop_token_ids=None, strip_prompt=True)
    for row, length in enumerate((3, 6)):
        new = 20 - length
        ids, mask = stripped["token_ids"][row], stripped["padding_mask"][row]
        np.testing.assert_array_equal(ids[:new], full["token_ids"][row, length:])
        assert mask[:new].all() and not mask[new:].any()


def test_generate_after_lora_sees_the_new_weights(lm):
    prompt = _prompt((4, 2), 20, seed=5)
    before = lm.generate(prompt, stop_token_ids=None)
    lm.backbone.enable_lora(rank=2)
    rng = np.random.default_rng(0)
    for variable in lm.weights:
        if "lora_kernel" in variable.path:
            variable.assign(rng.normal(0, 0.5, variable.shape).astype("float32"))
    after = lm.generate(prompt, stop_token_ids=None)
    assert not np.array_equal(after["token_ids"], before["token_ids"])
    _greedy_is_self_consistent(lm, after, prompt["padding_mask"])


# With a tokenizer and preprocessor: strings in and out.


@pytest.fixture(scope="module")
def text_lm(sentencepiece_proto):
    from keras_gemma.preprocessor import GemmaCausalLMPreprocessor
    from keras_gemma.tokenizer import GemmaTokenizer

    tokenizer = GemmaTokenizer(proto=sentencepiece_proto)
    preprocessor = GemmaCausalLMPreprocessor(tokenizer, sequence_length=16)
    lm = _tiny_lm(vocabulary_size=tokenizer.vocabulary_size())
    return type(lm)(lm.backbone, preprocessor)


def test_auto_stop_tokens_are_eos_and_end_of_turn(text_lm):
    assert text_lm._stop_token_ids("auto") == (1, 107)
    assert text_lm._stop_token_ids(None) == ()
    with pytest.raises(ValueError, match="preprocessor"):
        _tiny_lm().generate(_prompt((2,), 8))


def test_strings_in_strings_out_and_stream(text_lm):
    # (Batches of one and two rows only: each batch size is one more compile.)
    single = text_lm.generate("The model", max_length=24)
    assert isinstance(single, str) and single.startswith("The model")
    batch = text_lm.generate(["Keras is a layer", "The model"], max_length=24)
    assert isinstance(batch, list) and len(batch) == 2 and batch[1] == single
    import tensorflow as tf

    texts = ["Keras is a layer", "The model", "Hi", "A token"]
    dataset = tf.data.Dataset.from_tensor_slices(texts).batch(2)
    from_dataset = text_lm.generate(dataset, max_length=24)
    assert len(from_dataset) == 4 and from_dataset[:2] == batch
    stripped = text_lm.generate(["Keras is a layer", "The model"], max_length=24, strip_prompt=True)
    continuation = stripped[1]
    assert len(continuation) > 3 and single.endswith(continuation)
    pieces = list(text_lm.stream("The model", max_length=24))
    assert len(pieces) > 1
    assert "".join(pieces) == continuation


def test_token_ids_with_a_preprocessor_and_saving(text_lm, tmp_path):
    prompt = _prompt((3, 5), 16)
    output = text_lm.generate(prompt, stop_token_ids=None)  # dict in, dict out
    assert set(output) == {"token_ids", "padding_mask"} and output["padding_mask"].all()
    path = str(tmp_path / "text_lm.keras")
    text_lm.save(path)
    restored = keras.saving.load_model(path)
    assert type(restored.preprocessor).__name__ == "GemmaCausalLMPreprocessor"
    assert restored.preprocessor.sequence_length == 16
    packed = restored.preprocessor.generate_preprocess(["The model"])
    expected = text_lm.preprocessor.generate_preprocess(["The model"])
    np.testing.assert_array_equal(packed["token_ids"], expected["token_ids"])
    np.testing.assert_array_equal(to_numpy(restored(prompt)), to_numpy(text_lm(prompt)))


def test_fit_on_strings_lowers_the_loss(text_lm, tmp_path):
    texts = ["the model is a layer of keras", "a token is a value of the text"] * 4
    text_lm.compile(optimizer=keras.optimizers.AdamW(learning_rate=1e-2))
    losses = text_lm.fit(texts, batch_size=4, epochs=5, verbose=0).history["loss"]
    assert losses[-1] < 0.7 * losses[0], losses
    # A numpy array of strings, through evaluate().
    loss = text_lm.evaluate(np.array(texts), batch_size=4, verbose=0, return_dict=True)["loss"]
    assert loss < losses[0]
    import tensorflow as tf

    dataset = tf.data.Dataset.from_tensor_slices(texts).batch(4)
    history = text_lm.fit(dataset, epochs=1, verbose=0).history["loss"]
    assert np.isfinite(history[0])
    # Text files, a line an example (README: "Training data"): the same rows, the same loss.
    paths = []
    for index in range(2):
        paths.append(str(tmp_path / f"part-{index}.txt"))
        with open(paths[-1], "w", encoding="utf-8") as file:
            file.write("\n".join(texts[4 * index:4 * index + 4]) + "\n")
    lines = tf.data.TextLineDataset(paths).batch(4)
    from_files = text_lm.evaluate(lines, verbose=0, return_dict=True)["loss"]
    from_list = text_lm.evaluate(texts, batch_size=4, verbose=0, return_dict=True)["loss"]
    np.testing.assert_allclose(from_files, from_list, rtol=1e-5)
    assert np.isfinite(text_lm.fit(lines, epochs=1, verbose=0).history["loss"][0])


def test_text_stream_emits_whole_characters(sentencepiece_proto):
    from keras_gemma.tokenizer import GemmaTokenizer

    tokenizer = GemmaTokenizer(proto=sentencepiece_proto)
    text = "Ein Preis von 5€, 日本語 und ü."
    ids = tokenizer(text).tolist()
    assert len(ids) > len(text.encode("utf-8")) // 2  # the rare characters fall back to bytes
    stream = TextStream(tokenizer)
    pieces = [stream.add(i) for i in ids] + [stream.flush()]
    assert not any("\ufffd" in piece for piece in pieces)
    assert "".join(pieces) == text
    # A multi-byte character comes out whole, with its last byte.
    euro = [i for i, piece in enumerate(pieces) if "€" in piece]
    assert len(euro) == 1 and ids[euro[0]] != ids[euro[0] - 1]
