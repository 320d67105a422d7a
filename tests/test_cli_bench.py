"""`keras-gemma bench`: figures of one preset, measured on the model it loads."""

import json

import pytest

from keras_gemma import GemmaCausalLM
from keras_gemma.cli import main
from keras_gemma.cli_bench import measure


def test_bench_reports_the_model_it_measured(tiny_preset, capsys):
    status = main(["bench", tiny_preset, "--json", "--new-tokens", "5", "--repeats", "1",
                   "--batch-size", "2", "--prompt-length", "3"])
    assert status == 0
    figures = json.loads(capsys.readouterr().out)
    lm = GemmaCausalLM.from_preset(tiny_preset)
    assert figures["parameters"] == lm.backbone.count_params()
    assert (figures["batch_size"], figures["prompt_length"], figures["new_tokens"]) == (2, 3, 5)
    assert figures["decode_tokens_per_second"] > 0
    assert figures["prefill_seconds"] > 0 and figures["compile_seconds"] >= 0
    assert figures["peak_rss_gb"] > 0.05  # at least the framework itself


def test_bench_text_output(tiny_preset, capsys):
    assert main(["bench", tiny_preset, "--new-tokens", "3", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "tokens/s per sequence" in out and "GB peak resident" in out


def test_decode_speed_needs_two_lengths(tiny_preset):
    lm = GemmaCausalLM.from_preset(tiny_preset)
    with pytest.raises(ValueError, match="new_tokens must be at least 2"):
        measure(lm, batch_size=1, prompt_length=3, new_tokens=1, repeats=1)


def test_bench_of_a_missing_preset_is_a_clear_error(capsys, tmp_path):
    assert main(["bench", str(tmp_path / "nothing_here")]) == 1
    assert "keras-gemma: error:" in capsys.readouterr().err
