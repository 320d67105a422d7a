"""GemmaCausalLMPreprocessor: strings -> packed ids, masks and next-token labels, and back.

Like the tokenizer it wraps, it runs eagerly on Python / numpy data on every Keras backend
and inside tf.data / tf.function graphs. Eager outputs are tensors of the Keras backend, as
KerasHub's are, so that they mix with `keras.ops` and model calls; in a graph they are tf
tensors.
"""

import warnings

import keras
import numpy as np

from keras_gemma.checkpoints.preset_cards import PresetMapping
from keras_gemma.packing import pack_rows
from keras_gemma.packing import shifted_weights
from keras_gemma.text_inputs import in_tf_graph as _in_tf_graph
from keras_gemma.text_inputs import to_backend
from keras_gemma.text_inputs import to_python as _to_python
from keras_gemma.tokenizer import GemmaTokenizer
from keras_gemma.training_examples import is_chat_data
from keras_gemma.training_examples import pack_chats
from keras_gemma.training_examples import pack_pairs
from keras_gemma.training_examples import pack_pairs_tf
from keras_gemma.training_examples import text_fields


def _check_sequence_length(value):
    # Training packs sequence_length + 1 ids and shifts by one, so 2 is the least length that
    # leaves a token to predict from and a token to predict.
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 2:
        raise ValueError(
            "GemmaCausalLMPreprocessor: `sequence_length` must be an integer >= 2. "
            f"Received: {value!r}. Pass e.g. sequence_length=512 (the padded length of the "
            "model inputs, in tokens)."
        )
    return int(value)


@keras.saving.register_keras_serializable(package="keras_gemma")
class GemmaCausalLMPreprocessor(keras.layers.Layer):
    """Preprocessing for Gemma causal language modeling.

    Calling the layer on strings gives `(x, y, sample_weight)` for `fit()`: each string becomes
    `<bos> + ids + <eos>`, is truncated (the end token is kept) and padded to
    `sequence_length + 1`, and then `x = {"token_ids": ids[:-1], "padding_mask": mask[:-1]}`,
    `y = ids[1:]`, `sample_weight = mask[1:]`, each a tensor of the Keras backend (int32 ids,
    bool masks). Two other forms of training data weight the loss on the answers only (see
    keras_gemma/training_examples.py):
    - `{"prompts": [...], "responses": [...]}` packs `<bos> prompt response <eos>` with
      sample_weight 0 on the prompt (as KerasHub's Gemma 3 preprocessor, trimmed alike);
    - chat conversations, a list of `[{"role": "user", "content": ...}, {"role": "model",
      "content": ...}, ...]` lists, are rendered with Gemma's chat template; only the model
      turns (their text and `<end_of_turn>`) count in the loss (eager calls: Python lists of
      dicts do not enter tf.data; render them to prompts/responses for a tf.data pipeline).
    With `packing=True`, the examples of one call are packed first-fit into as few rows as
    hold them; `padding_mask` then holds segment ids (0 padding, k the row's k-th example),
    which the backbone reads as "attend within your own example" (keras_gemma/packing.py).

    `generate_preprocess()` packs prompts for generation (a start token, no end
    token); `generate_postprocess()` turns generated ids (numpy or tensors) back into strings
    without padding, `<bos>` and `<eos>`; chat turn markers stay, as in KerasHub.

    Args:
        tokenizer: a `keras_gemma.GemmaTokenizer` (without its own `sequence_length`).
        sequence_length: the length of the packed model inputs.
        add_start_token: whether to put `<bos>` first.
        add_end_token: whether to put `<eos>` last when calling for training.
        packing: pack several short examples per row for training (eager calls only).

    Example:
    ```python
    preprocessor = keras_gemma.GemmaCausalLMPreprocessor(tokenizer, sequence_length=8)
    x, y, sample_weight = preprocessor(["The quick brown fox.", "Hi"])
    x["token_ids"].shape                                   # (2, 8)
    x, y, sample_weight = preprocessor({"prompts": ["Say hi:"], "responses": ["Hi!"]})
    chat = [{"role": "user", "content": "Hi"}, {"role": "model", "content": "Hello!"}]
    x, y, sample_weight = preprocessor([chat])             # loss on "Hello!<end_of_turn>"
    logits = lm({"token_ids": x["token_ids"], "padding_mask": keras.ops.ones_like(x["token_ids"])})
    ds = tf.data.Dataset.from_tensor_slices(texts).batch(4).map(preprocessor)
    prompt = preprocessor.generate_preprocess(["Say hi:"])  # <bos> + ids, no <eos>
    preprocessor.generate_postprocess(prompt)               # ["Say hi:"]
    preprocessor.save_to_preset("./my_gemma")              # its settings and tokenizer
    ```
    """

    presets = PresetMapping()

    @classmethod
    def from_preset(cls, preset, sequence_length=None, **kwargs):
        """The preprocessor of a preset: its tokenizer and, where saved, its settings.

        Example:
        >>> preprocessor = GemmaCausalLMPreprocessor.from_preset("gemma_2b_en", sequence_length=256)
        """
        from keras_gemma.checkpoints.loader import preset_metadata, resolve

        resolved = resolve(preset)
        # The packing length is the preprocessor's own; a tokenizer saved with one gets none.
        tokenizer = GemmaTokenizer.from_preset(resolved, sequence_length=None)
        settings = dict(preset_metadata(resolved).get("preprocessor") or {})
        settings.pop("tokenizer", None)
        settings = {
            key: value
            for key, value in settings.items()
            if key in ("sequence_length", "add_start_token", "add_end_token", "packing")
        }
        if sequence_length is not None:
            settings["sequence_length"] = sequence_length
        settings.update(kwargs)
        return cls(tokenizer, **settings)

    def save_to_preset(self, preset_dir):
        """Writes these settings and the tokenizer into a preset directory, keeping the rest
        of what is there (a backbone saved before or after).

        Example:
        >>> preprocessor.save_to_preset("./my_gemma")
        >>> GemmaCausalLMPreprocessor.from_preset("./my_gemma").sequence_length
        """
        from keras_gemma.checkpoints.preset_parts import save_preprocessor

        return save_preprocessor(preset_dir, self)

    def __init__(
        self,
        tokenizer,
        sequence_length=1024,
        add_start_token=True,
        add_end_token=True,
        packing=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self._convert_input_args = False
        self._allow_non_tensor_positional_args = True
        self.built = True
        if not isinstance(tokenizer, GemmaTokenizer):
            raise TypeError(
                "GemmaCausalLMPreprocessor: `tokenizer` must be a keras_gemma.GemmaTokenizer. "
                f"Received: {type(tokenizer).__name__}."
            )
        if tokenizer.sequence_length is not None:
            raise ValueError(
                "GemmaCausalLMPreprocessor: pass a tokenizer without `sequence_length`; the "
                "preprocessor pads and truncates to its own `sequence_length`."
            )
        self.tokenizer = tokenizer
        self.sequence_length = sequence_length
        self.add_start_token = bool(add_start_token)
        self.add_end_token = bool(add_end_token)
        self.packing = bool(packing)

    @property
    def sequence_length(self):
        """The padded length of the model inputs."""
        return self._sequence_length

    @sequence_length.setter
    def sequence_length(self, value):
        self._sequence_length = _check_sequence_length(value)

    def call(self, x, y=None, sample_weight=None, sequence_length=None):
        if y is not None or sample_weight is not None:
            warnings.warn(
                "GemmaCausalLMPreprocessor computes `y` and `sample_weight` from `x` (the next "
                "token at each position); the `y` / `sample_weight` passed in are ignored.",
                stacklevel=2,
            )
        length = self._length(sequence_length)
        # One extra position, because the inputs and the labels are the same ids shifted by one.
        ids, mask, trained = self._pack_training(x, length + 1)
        if self.packing:
            if _in_tf_graph():
                raise ValueError(
                    f"{type(self).__name__}(packing=True) packs a whole list of examples "
                    "eagerly; it cannot run inside tf.data. Pass Python lists to `fit`, or "
                    "use packing=False in a tf.data pipeline."
                )
            if ids.ndim == 1:
                ids, mask, trained = ids[None], mask[None], trained[None]
            ids, segments, trained = pack_rows(ids, mask, trained)
            x = {"token_ids": ids[..., :-1], "padding_mask": segments[..., :-1]}
            weights = shifted_weights(segments, trained)
        else:
            x = {"token_ids": ids[..., :-1], "padding_mask": mask[..., :-1]}
            weights = trained[..., 1:]
        return self._outputs(keras.utils.pack_x_y_sample_weight(x, ids[..., 1:], weights))

    def _pack_training(self, x, length):
        """(ids, mask, trained) of length `length` for strings, prompts/responses or chats."""
        start = [self.tokenizer.start_token_id] if self.add_start_token else []
        end = [self.tokenizer.end_token_id] if self.add_end_token else []
        if isinstance(x, dict):
            prompts, responses = self._text_fields(x, need_responses=True)
            return self._pack_pair(prompts, responses, length, start, end)
        if is_chat_data(x):
            return pack_chats(self.tokenizer, x, length, start, end)
        ids, mask = self._pack(x, length, self.add_start_token, self.add_end_token)
        return ids, mask, mask

    def _text_fields(self, x, need_responses):
        """(prompts, responses) of a dict input; subclasses check their own extra keys."""
        return text_fields(x, type(self).__name__, need_responses)

    def _pack_pair(self, prompts, responses, length, start, end):
        """`start prompt response end` padded to `length`: (ids, mask, response mask)."""
        if _in_tf_graph():
            return pack_pairs_tf(self.tokenizer, prompts, responses, length, start, end)
        return pack_pairs(self.tokenizer, prompts, responses, length, start, end)

    def generate_preprocess(self, x, sequence_length=None):
        """Strings -> `{"token_ids", "padding_mask"}` for generation: `<bos>`, no `<eos>`."""
        # No end token: generation continues from the end of the prompt.
        ids, mask = self._pack(x, self._length(sequence_length), self.add_start_token, False)
        return self._outputs({"token_ids": ids, "padding_mask": mask})

    @staticmethod
    def _outputs(outputs):
        # Graphs already hold tf tensors; eager numpy becomes the backend's tensors.
        if _in_tf_graph():
            return outputs
        return keras.tree.map_structure(to_backend, outputs)

    def generate_postprocess(self, x):
        """`{"token_ids", "padding_mask"}` (numpy, lists or tensors) -> strings, without the
        positions the mask hides and without padding, `<bos>` and `<eos>`."""
        name = type(self).__name__
        if not isinstance(x, dict) or "token_ids" not in x or "padding_mask" not in x:
            raise TypeError(
                f"{name}.generate_postprocess expects a dict with 'token_ids' and 'padding_mask'."
            )
        special = self._ids_to_strip()
        if _in_tf_graph():
            import tensorflow as tf

            ids = tf.cast(x["token_ids"], "int32")
            keep = tf.cast(x["padding_mask"], "bool")
            for token in special:
                keep = keep & (ids != token)
            return self.tokenizer.detokenize(tf.ragged.boolean_mask(ids, keep))
        ids = np.asarray(_to_python(x["token_ids"]))
        keep = np.asarray(_to_python(x["padding_mask"])).astype(bool)
        if ids.shape != keep.shape:
            raise ValueError(
                f"{name}.generate_postprocess: token_ids and padding_mask have different "
                f"shapes {ids.shape} and {keep.shape}."
            )
        keep &= ~np.isin(ids, special)
        if ids.ndim == 1:
            return self.tokenizer.detokenize(ids[keep].tolist())
        return [self.tokenizer.detokenize(row[k].tolist()) for row, k in zip(ids, keep)]

    def _ids_to_strip(self):
        """The token ids `generate_postprocess` removes (KerasHub's: the tokenizer's special ids)."""
        return list(self.tokenizer.special_token_ids)

    def _length(self, sequence_length):
        if sequence_length is None:
            return self.sequence_length
        return _check_sequence_length(sequence_length)

    def _pack(self, x, length, add_start, add_end):
        """Tokenize, truncate (keeping start/end tokens) and right-pad to `length`."""
        start = [self.tokenizer.start_token_id] if add_start else []
        end = [self.tokenizer.end_token_id] if add_end else []
        keep = length - len(start) - len(end)
        if _in_tf_graph():
            return self._pack_tf(x, length, start, end, keep)
        rows = self.tokenizer.tokenize(x)
        single = isinstance(rows, np.ndarray)
        if single:
            rows = [rows.tolist()]
        ids = np.full((len(rows), length), self.tokenizer.pad_token_id, dtype="int32")
        mask = np.zeros((len(rows), length), dtype=bool)
        for i, row in enumerate(rows):
            packed = start + row[:keep] + end
            ids[i, : len(packed)] = packed
            mask[i, : len(packed)] = True
        return (ids[0], mask[0]) if single else (ids, mask)

    def _pack_tf(self, x, length, start, end, keep):
        import tensorflow as tf

        rows = self.tokenizer.tokenize(x)
        single = not isinstance(rows, tf.RaggedTensor)
        if single:
            rows = tf.RaggedTensor.from_tensor(rows[tf.newaxis])
        if rows.shape.rank != 2:
            raise ValueError(
                "GemmaCausalLMPreprocessor expects a string or a 1-D batch of strings; received "
                f"a batch of rank {rows.shape.rank - 1}."
            )
        rows = rows[:, :keep]
        batch = rows.nrows()
        parts = [tf.RaggedTensor.from_tensor(tf.fill([batch, 1], v)) for v in start]
        parts += [rows]
        parts += [tf.RaggedTensor.from_tensor(tf.fill([batch, 1], v)) for v in end]
        rows = tf.concat(parts, axis=1) if len(parts) > 1 else rows
        ids = rows.to_tensor(default_value=self.tokenizer.pad_token_id, shape=[None, length])
        mask = tf.ones_like(rows, dtype="bool").to_tensor(default_value=False, shape=[None, length])
        return (ids[0], mask[0]) if single else (ids, mask)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "tokenizer": keras.saving.serialize_keras_object(self.tokenizer),
                "sequence_length": self.sequence_length,
                "add_start_token": self.add_start_token,
                "add_end_token": self.add_end_token,
                "packing": self.packing,
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if isinstance(config.get("tokenizer"), dict):
            config["tokenizer"] = keras.saving.deserialize_keras_object(config["tokenizer"])
        return cls(**config)
