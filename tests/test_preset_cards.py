"""The preset cards shipped in presets/."""

import pytest

import keras_gemma
from keras_gemma import GemmaBackbone
from keras_gemma.checkpoints import preset_cards

REQUIRED = [
    "gemma_2b_en", "gemma_instruct_2b_en", "gemma_1.1_instruct_2b_en", "gemma_7b_en",
    "gemma_instruct_7b_en", "gemma_1.1_instruct_7b_en", "code_gemma_2b_en",
    "code_gemma_7b_en", "code_gemma_instruct_7b_en", "gemma2_2b_en", "gemma2_instruct_2b_en",
    "gemma2_9b_en", "gemma2_instruct_9b_en", "gemma2_27b_en", "gemma2_instruct_27b_en",
    "gemma3_270m", "gemma3_instruct_270m", "gemma3_1b", "gemma3_instruct_1b",
    "gemma3_4b_text", "gemma3_12b_text", "gemma3_27b_text",
]


def test_every_required_preset_has_a_card():
    assert set(REQUIRED) <= set(keras_gemma.list_presets())


@pytest.mark.parametrize("name", sorted(preset_cards.all_cards()))
def test_card_architecture_has_its_stated_parameter_count(name):
    # The stated counts were taken from KerasHub's preset metadata, not computed here; the
    # formula itself is checked against built models in test_backbone.py.
    card = preset_cards.get_card(name)
    assert GemmaBackbone.parameter_count(card["backbone"]) == card["parameter_count"]


@pytest.mark.parametrize("name", sorted(preset_cards.all_cards()))
def test_card_is_complete(name):
    card = preset_cards.get_card(name)
    assert card["sources"]["kaggle"].startswith("kaggle://keras/")
    assert card["sources"]["huggingface"].startswith("hf://google/")
    assert card["instruction_tuned"] == ("instruct" in name)
    assert ("<end_of_turn>" in card["stop_tokens"]) == card["instruction_tuned"]
    assert card["description"]


def test_unknown_name_suggests_close_ones():
    with pytest.raises(ValueError, match="gemma_2b_en"):
        preset_cards.get_card("gemma_2b")


def test_presets_mapping_on_the_class():
    assert GemmaBackbone.presets["gemma_7b_en"]["parameter_count"] == 8_537_680_896
    assert "gemma3_270m" in GemmaBackbone.presets
