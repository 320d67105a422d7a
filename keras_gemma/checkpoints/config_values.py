"""Numbers read out of a checkpoint's config (config.json, GGUF metadata), checked as read.

`int("thirty-two")` or `int(96.5)` would either fail naming no key or silently truncate;
these readers refuse a value of the wrong type naming the file, the key and the value.

Example:
>>> config_integer({"hidden_size": 640}, "hidden_size", "config.json")
640
>>> config_integer({"hidden_size": "640"}, "hidden_size", "config.json")
Traceback (most recent call last):
ValueError: config.json: `hidden_size` must be an integer, got '640' (str). ...
"""

import numbers

_REQUIRED = object()


def _lookup(config, key, where, default):
    if not isinstance(config, dict):
        raise ValueError(
            f"{where} must hold a JSON object of settings, got {type(config).__name__}. "
            "Download or write the file again."
        )
    if key in config and config[key] is not None:
        return config[key]
    if default is _REQUIRED:
        raise ValueError(
            f"{where} lacks the key {key!r}, which every Gemma checkpoint has. Download the "
            "checkpoint again, or add the entry."
        )
    return default


def _wrong(where, key, value, wanted):
    return ValueError(
        f"{where}: `{key}` must be {wanted}, got {value!r} ({type(value).__name__}). Fix that "
        "entry (or download the checkpoint again)."
    )


def config_integer(config, key, where, default=_REQUIRED):
    """`config[key]` as an int; a missing key gives `default` (required when not given)."""
    value = _lookup(config, key, where, default)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise _wrong(where, key, value, "an integer")
    return int(value)


def config_number(config, key, where, default=_REQUIRED):
    """`config[key]` as a float; a missing key gives `default` (required when not given)."""
    value = _lookup(config, key, where, default)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _wrong(where, key, value, "a number")
    return float(value)
