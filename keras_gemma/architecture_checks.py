"""Checks of GemmaBackbone's architecture arguments, before a single layer is built.

Called by `GemmaBackbone.__init__` (the caller's own arguments) and by the checkpoint loaders
(arguments read from a config.json or GGUF metadata), so that a wrong value is named where it
came from, e.g. "config.json: num_hidden_layers must be a positive integer, got -1", rather
than surfacing as an error from deep inside a layer. Only sizes and switches are checked here;
the dtype policy is checked by the loaders (checkpoints/preset_format.py).

Example:
>>> check_architecture(dict(vocabulary_size=100, num_layers=2, num_query_heads=4,
...     num_key_value_heads=2, hidden_dim=16, intermediate_dim=32, head_dim=8))
>>> check_architecture({"num_layers": -1}, where="config.json",
...     names={"num_layers": "num_hidden_layers"})
Traceback (most recent call last):
ValueError: config.json: `num_hidden_layers` must be a positive integer, got -1. ...
"""

import numbers

# No Gemma comes near these; a value past one is a corrupt or hostile file, refused before
# the model (and its weights) would be allocated.
_LIMITS = {
    "vocabulary_size": 2**22,
    "num_layers": 2**12,
    "num_query_heads": 2**12,
    "num_key_value_heads": 2**12,
    "hidden_dim": 2**17,
    "intermediate_dim": 2**20,
    "head_dim": 2**13,
    "sliding_window_size": 2**31,
    "sliding_window_pattern": 2**12,
}
_POSITIVE_NUMBERS = ("layer_norm_epsilon", "local_rope_max_wavelength",
                     "global_rope_max_wavelength", "local_rope_scaling_factor",
                     "global_rope_scaling_factor")
_OPTIONAL_POSITIVE_NUMBERS = ("query_pre_attn_scalar", "attention_logit_soft_cap",
                              "final_logit_soft_cap")


def is_integer(value):
    """An int (Python or numpy), and not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


class _Reporter:
    """Builds error messages that name the entry as the caller wrote it."""

    def __init__(self, where, names):
        self.where = where
        self.names = names or {}

    def fail(self, argument, problem, value, reason=""):
        entry = self.names.get(argument, argument)
        prefix = f"{self.where}: " if self.where else "GemmaBackbone: "
        alias = f" (GemmaBackbone's `{argument}`)" if entry != argument else ""
        advice = (
            "Fix that entry (or download the checkpoint again)." if self.where
            else f"Pass a valid `{argument}`."
        )
        raise ValueError(f"{prefix}`{entry}`{alias} {problem}, got {value!r}. {reason}{advice}")


def check_architecture(arguments, where=None, names=None):
    """Raises a ValueError naming the first argument of `arguments` that cannot make a Gemma.

    `where` (e.g. a config.json path) and `names` (our argument name -> the file's key) make
    the message point at the file's entry. Arguments absent from `arguments` are not checked.
    """
    report = _Reporter(where, names)
    for key, limit in _LIMITS.items():
        if key not in arguments:
            continue
        value = arguments[key]
        if not is_integer(value) or value < 1:
            report.fail(key, "must be a positive integer", value)
        if value > limit:
            report.fail(key, f"is larger than any Gemma's (at most {limit})", value)
    for key in _POSITIVE_NUMBERS:
        if key in arguments:
            value = arguments[key]
            if not _is_number(value) or not value > 0:
                report.fail(key, "must be a positive number", value)
    for key in _OPTIONAL_POSITIVE_NUMBERS:
        if arguments.get(key) is not None:
            value = arguments[key]
            if not _is_number(value) or not value > 0:
                report.fail(key, "must be a positive number or null (None)", value)
    dropout = arguments.get("dropout", 0.0)
    if not _is_number(dropout) or not 0 <= dropout < 1:
        report.fail("dropout", "must be a number in [0, 1)", dropout)
    heads, kv_heads = arguments.get("num_query_heads"), arguments.get("num_key_value_heads")
    if heads is not None and kv_heads is not None and heads % kv_heads:
        report.fail(
            "num_key_value_heads",
            f"must divide the number of query heads ({heads})",
            kv_heads,
            "Grouped-query attention shares each key/value head among a whole number of query "
            "heads. ",
        )
    if arguments.get("intermediate_dim", 0) % 2:
        report.fail("intermediate_dim", "must be even (twice the feed-forward width, KerasHub's "
                    "convention)", arguments["intermediate_dim"])
    if arguments.get("head_dim", 0) % 2:
        report.fail("head_dim", "must be even for rotary embeddings", arguments["head_dim"])
