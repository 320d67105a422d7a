"""TF SavedModel export of a GemmaCausalLM: text in, generated text out, for TF Serving.

The SavedModel holds three signatures:
- `generate`: `prompts` tf.string [batch] (and optionally `max_length` int32 scalar) ->
  `{"text": tf.string [batch]}`, the prompt followed by its continuation, as
  `GemmaCausalLM.generate` returns it. Tokenization (tensorflow-text's SentencePiece op; the
  model file travels as a SavedModel asset), prefill, the decode loop and detokenization all
  run inside the graph.
- `logits`: `token_ids` int32 [batch, seq], `padding_mask` int32 [batch, seq] ->
  `{"logits": float32 [batch, seq, vocabulary]}`.
- `serving_default`: the same as `generate`.

Defined behaviour at the edges, never an error: an empty batch gives an empty batch; an
empty string is a prompt of just `<bos>`; a prompt of more than `max_length` tokens keeps its
first `max_length` tokens (`<bos>` included) and gets no new ones, exactly as
`GemmaCausalLM.generate` truncates; a requested `max_length` is clipped to [2, the exported
one].

A model built on JAX or PyTorch is exported by saving it as a preset and rebuilding it under
the TensorFlow backend in a subprocess (the weights are the same bytes).
"""

import os
import subprocess
import sys
import tempfile

import keras

from keras_gemma.generation import get_sampler
from keras_gemma.generation.buckets import length_bucket


def export_saved_model(causal_lm, path, max_length=512, sampler="greedy"):
    """Writes `causal_lm` as a TF SavedModel with `generate` and `logits` signatures.

    Args:
        causal_lm: a `keras_gemma.GemmaCausalLM` with a preprocessor.
        path: the SavedModel directory to write (replaced atomically if it exists).
        max_length: the longest output (prompt included) a request may ask for.
        sampler: "greedy" or another sampler name/object; random samplers draw a fresh seed
            per request.

    Example:
    >>> lm = keras_gemma.GemmaCausalLM.from_preset("gemma3_270m")
    >>> keras_gemma.export_saved_model(lm, "./served/gemma/1", max_length=128)
    """
    if causal_lm.preprocessor is None:
        raise ValueError(
            "export_saved_model needs a GemmaCausalLM with a preprocessor (the SavedModel "
            "tokenizes prompts itself)."
        )
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an integer >= 2; got {max_length!r}.")
    if getattr(get_sampler(sampler), "needs_hidden_states", False):
        raise ValueError(
            "export_saved_model: contrastive search needs the decode loop's hidden states, "
            "which the exported loop does not carry; export with another sampler "
            '("greedy", "top_k", "top_p" or "random").'
        )
    path = os.path.abspath(os.fspath(path))
    if keras.backend.backend() == "tensorflow":
        _export_here(causal_lm, path, max_length, sampler)
        return path
    _export_in_subprocess(causal_lm, path, max_length, sampler)
    return path


def _export_in_subprocess(causal_lm, path, max_length, sampler):
    sampler_config = keras.saving.serialize_keras_object(get_sampler(sampler))
    with tempfile.TemporaryDirectory(prefix="keras_gemma_export_") as staging:
        preset = os.path.join(staging, "preset")
        causal_lm.save_to_preset(preset)
        import json

        sampler_path = os.path.join(staging, "sampler.json")
        with open(sampler_path, "w") as file:
            json.dump(sampler_config, file)
        environment = dict(os.environ, KERAS_BACKEND="tensorflow")
        command = [
            sys.executable, "-m", "keras_gemma.export.subprocess_export",
            preset, path, str(max_length), sampler_path,
        ]
        result = subprocess.run(command, env=environment, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(
                "exporting under the TensorFlow backend (in a subprocess) failed:\n"
                + result.stderr[-4000:]
            )


def _export_here(causal_lm, path, max_length, sampler):
    import tensorflow as tf

    from keras_gemma.atomic_write import atomic_directory
    from keras_gemma.export.signatures import build_signatures

    sampler = get_sampler(sampler)
    # The SavedModel is assembled beside `path` and renamed into place (an earlier export
    # there is replaced; any other non-empty directory is refused). The tokenizer file the
    # graph reads is copied into the SavedModel's assets, so its own copy is scratch.
    with tempfile.TemporaryDirectory(prefix="keras_gemma_export_") as scratch:
        proto_file = os.path.join(scratch, "tokenizer.model")
        with open(proto_file, "wb") as file:
            file.write(causal_lm.preprocessor.tokenizer.proto)
        module, signatures = build_signatures(
            causal_lm, proto_file, length_bucket(max_length), max_length, sampler
        )
        marker = dict(marker="saved_model.pb", description="an earlier export")
        with atomic_directory(path, **marker) as staging:
            tf.saved_model.save(module, staging, signatures=signatures)
