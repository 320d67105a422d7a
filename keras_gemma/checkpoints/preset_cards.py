"""The preset cards: one JSON file per preset in the top-level presets/ directory."""

import difflib
import functools
import json
import os


def _card_directory():
    try:
        from importlib import resources

        directory = resources.files("keras_gemma.presets")
        if directory.is_dir():
            return directory
    except (ImportError, ModuleNotFoundError, TypeError):
        pass
    # A source checkout that was not installed.
    return os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "presets")


@functools.lru_cache(maxsize=None)
def all_cards():
    """`{name: card}` for every shipped preset card."""
    directory = _card_directory()
    cards = {}
    entries = directory.iterdir() if hasattr(directory, "iterdir") else (
        os.path.join(directory, name) for name in os.listdir(directory)
    )
    for entry in entries:
        name = getattr(entry, "name", os.path.basename(str(entry)))
        if not name.endswith(".json"):
            continue
        text = entry.read_text() if hasattr(entry, "read_text") else open(entry).read()
        card = json.loads(text)
        cards[card["name"]] = card
    return dict(sorted(cards.items()))


def list_presets():
    """Names of the presets keras_gemma knows.

    Example:
    >>> "gemma_2b_en" in list_presets()
    True
    """
    return list(all_cards())


def is_preset_name(handle):
    return isinstance(handle, str) and handle in all_cards()


def get_card(name):
    """The card of preset `name`; an unknown name gets the close ones suggested."""
    cards = all_cards()
    if name in cards:
        return cards[name]
    close = difflib.get_close_matches(name, list(cards), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(
        f"unknown preset {name!r}.{hint} keras_gemma.list_presets() lists them all; a local "
        "directory, a .gguf file, kaggle://... or hf://... handle also works."
    )


class PresetMapping:
    """A read-only `{name: card}` view of the shipped presets, read on first use.

    Each public class exposes one as `presets`, as KerasHub's classes do.

    Example:
    >>> GemmaBackbone.presets["gemma_2b_en"]["parameter_count"]
    2506172416
    """

    def __getitem__(self, name):
        return all_cards()[name]

    def __iter__(self):
        return iter(all_cards())

    def __len__(self):
        return len(all_cards())

    def __contains__(self, name):
        return name in all_cards()

    def keys(self):
        return all_cards().keys()

    def items(self):
        return all_cards().items()

    def values(self):
        return all_cards().values()

    def __repr__(self):
        return f"PresetMapping({list(all_cards())})"
