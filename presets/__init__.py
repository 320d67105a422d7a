"""Preset cards, shipped inside the wheel as keras_gemma.presets (see pyproject.toml)."""
