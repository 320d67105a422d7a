"""The `keras-gemma` command line: argument errors, and generation on tiny presets."""

import os
import subprocess
import sys

import numpy as np
import pytest

import keras_gemma
from keras_gemma import GemmaBackbone
from keras_gemma.checkpoints.preset_format import save_preset
from keras_gemma.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _error(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_no_command(capsys):
    assert "the following arguments are required: COMMAND" in _error(capsys, [])


def test_unknown_command(capsys):
    assert "invalid choice: 'talk'" in _error(capsys, ["talk"])


def test_generate_needs_a_prompt(capsys):
    assert "the following arguments are required: prompt" in _error(capsys, ["generate"])


@pytest.mark.parametrize("value", ["0", "-3", "ten"])
def test_max_length_must_be_positive(capsys, value):
    err = _error(capsys, ["generate", "hi", "--max-length", value])
    assert f"argument --max-length: must be a positive integer, got '{value}'" in err


def test_unknown_sampler(capsys):
    err = _error(capsys, ["generate", "hi", "--sampler", "beam"])
    assert "argument --sampler: invalid choice: 'beam'" in err
    assert "'greedy', 'top_k', 'top_p'" in err


def test_seed_must_be_an_integer(capsys):
    err = _error(capsys, ["generate", "hi", "--seed", "x"])
    assert "argument --seed: invalid int value: 'x'" in err


def test_unknown_dtype(capsys):
    err = _error(capsys, ["generate", "hi", "--dtype", "int8"])
    assert "argument --dtype: invalid choice: 'int8'" in err


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = capsys.readouterr().out
    for option in ("--preset", "--max-length", "--sampler", "--seed", "--dtype", "--quantize",
                   "gemma3_270m"):
        assert option in out


# End to end, on a tiny preset directory.


def _needs_causal_lm():
    return keras_gemma.GemmaCausalLM


@pytest.fixture(scope="module")
def preset(sentencepiece_proto, tmp_path_factory):
    backbone = GemmaBackbone(vocabulary_size=1000, num_layers=2, num_query_heads=2,
                             num_key_value_heads=1, hidden_dim=32, intermediate_dim=64,
                             head_dim=16, dtype="float32")
    # Larger weights than the initializers give, so greedy text is not one repeated token.
    rng = np.random.default_rng(0)
    for variable in backbone.weights:
        variable.assign(rng.normal(0, 0.5, variable.shape).astype("float32"))
    with open(sentencepiece_proto, "rb") as file:
        proto = file.read()
    directory = str(tmp_path_factory.mktemp("cli") / "tiny_preset")
    return save_preset(directory, backbone, tokenizer_proto=proto)


def test_unknown_preset_is_a_clear_error(capsys):
    _needs_causal_lm()
    assert main(["generate", "hi", "--preset", "gemma_2b_ennn"]) == 1
    err = capsys.readouterr().err
    assert "keras-gemma: error: unknown preset 'gemma_2b_ennn'" in err
    assert "gemma_2b_en" in err  # suggested


def test_generate_streams_the_continuation(preset, capsys):
    model = _needs_causal_lm()
    assert main(["generate", "The model", "--preset", preset, "--max-length", "16"]) == 0
    captured = capsys.readouterr()
    expected = model.from_preset(preset).generate("The model", max_length=16, strip_prompt=True)
    assert expected and captured.out == "The model" + expected + "\n"
    assert f"keras-gemma: loading {preset}" in captured.err


def test_generate_quantized_while_loading(preset, capsys):
    model = _needs_causal_lm()
    argv = ["generate", "The model", "--preset", preset, "--max-length", "12", "--no-echo"]
    assert main(argv + ["--quantize", "int8"]) == 0
    expected = model.from_preset(preset)
    expected.quantize("int8")
    assert capsys.readouterr().out == expected.generate("The model", max_length=12,
                                                        strip_prompt=True) + "\n"
    assert "invalid choice: 'int3'" in _error(capsys, argv + ["--quantize", "int3"])


def test_seeded_sampling_repeats(preset, capsys):
    _needs_causal_lm()
    outputs = []
    for _ in range(2):
        argv = ["generate", "text", "--preset", preset, "--max-length", "12", "--sampler",
                "top_k", "--seed", "5", "--no-echo"]
        assert main(argv) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and outputs[0].strip()


def test_generate_from_a_gguf_file(tmp_path, sentencepiece_proto, monkeypatch, capsys):
    _needs_causal_lm()
    pytest.importorskip("gguf")
    pytest.importorskip("transformers")
    import gguf_files

    monkeypatch.setenv("KERAS_GEMMA_CACHE", str(tmp_path / "cache"))
    with open(sentencepiece_proto, "rb") as file:
        proto = file.read()
    model = gguf_files.transformers_model("gemma", width=4)
    path = gguf_files.write_gguf(tmp_path / "tiny.gguf", model, "gemma", proto, {"*": "Q8_0"})
    assert main(["generate", "Hello", "--preset", path, "--max-length", "10"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("Hello") and captured.out.endswith("\n")
    assert "converting tiny.gguf (first load only)" in captured.err


def test_python_dash_m_runs_the_command():
    environment = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-m", "keras_gemma", "generate", "--help"],
                            capture_output=True, text=True, env=environment, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: keras-gemma generate")


def test_export_writes_a_saved_model(preset, tmp_path, capsys):
    out = tmp_path / "served" / "1"
    assert main(["export", preset, str(out), "--max-length", "16"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert (out / "saved_model.pb").exists()
    assert (out / "assets" / "tokenizer.model").exists()


def test_export_of_an_unknown_preset_is_a_clear_error(tmp_path, capsys):
    assert main(["export", "gemma_2b_ennn", str(tmp_path / "x")]) == 1
    assert "unknown preset" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
