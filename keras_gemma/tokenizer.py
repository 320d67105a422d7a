"""GemmaTokenizer: Gemma's SentencePiece vocabulary as a Keras layer.

Two engines run the same model file and give the same ids:
- eagerly, the `sentencepiece` package, whatever the input (tf, jax or torch tensors are first
  read into numpy), so outputs are numpy / Python on every backend and TensorFlow is not needed
  (as KerasHub's tokenizers: a numpy array for one string, lists of ids for a batch);
- inside tf.data / tf.function graphs, `tensorflow_text` (outputs are tf tensors, ragged for a
  batch unless `sequence_length` is set).
TensorFlow is never imported by this module: if it was not imported already, no graph can be
tracing us.
"""

import base64
import os

import keras
import numpy as np
import sentencepiece as spm

from keras_gemma.chat_template import chat_turns
from keras_gemma.checkpoints.preset_cards import PresetMapping
from keras_gemma.text_inputs import as_strings as _as_strings
from keras_gemma.text_inputs import in_tf_graph as _in_tf_graph
from keras_gemma.text_inputs import is_int as _is_int
from keras_gemma.text_inputs import is_tf_tensor as _is_tf_tensor
from keras_gemma.text_inputs import tf_module as _tf_module
from keras_gemma.text_inputs import to_python as _to_python

TOKENIZER_FILENAME = "tokenizer.model"


def _special_id(piece, doc):
    return property(lambda self: self._special[piece], doc=doc)


def _read_proto(proto):
    """The serialized model bytes from a path or bytes, with errors that say what is wrong."""
    if isinstance(proto, (bytes, bytearray)):
        return bytes(proto)
    if isinstance(proto, os.PathLike):
        proto = os.fspath(proto)
    if isinstance(proto, str):
        if not os.path.isfile(proto):
            raise ValueError(f"GemmaTokenizer: SentencePiece model file not found: '{proto}'.")
        with open(proto, "rb") as f:
            return f.read()
    raise TypeError(
        "GemmaTokenizer: `proto` must be a path to a SentencePiece .model file or the "
        f"model's serialized bytes. Received: {type(proto).__name__}."
    )


@keras.saving.register_keras_serializable(package="keras_gemma")
class GemmaTokenizer(keras.layers.Layer):
    """Gemma's SentencePiece tokenizer.

    Args:
        proto: path to a SentencePiece `.model` file, or the file's bytes.
        sequence_length: if set, outputs are padded with `<pad>` or truncated to this length
            (a dense array even for a batch).

    Example:
    ```python
    tokenizer = keras_gemma.GemmaTokenizer(proto="tokenizer.model")
    ids = tokenizer("The quick brown fox.")            # 1-D int32 numpy array
    tokenizer.detokenize(ids)                          # "The quick brown fox."
    tokenizer(["a", "bc"])                             # [[...], [...]]
    ds = tf.data.Dataset.from_tensor_slices(texts).batch(8).map(tokenizer)  # tf.RaggedTensor
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi!"}])
    ```
    """

    presets = PresetMapping()

    @classmethod
    def from_preset(cls, preset, **kwargs):
        """The tokenizer of a preset name, preset directory, .gguf file or hub handle.

        A directory that `save_to_preset` wrote holds a tokenizer alone; its saved
        `sequence_length` applies unless `kwargs` give another.

        Example:
        >>> tokenizer = GemmaTokenizer.from_preset("gemma_2b_en")
        """
        from keras_gemma.checkpoints.loader import resolve, tokenizer_proto
        from keras_gemma.checkpoints.preset_parts import saved_tokenizer_config

        resolved = resolve(preset)
        config = saved_tokenizer_config(resolved)
        config.pop("has_vision_tokens", None)  # a Gemma3Tokenizer setting
        return cls(proto=tokenizer_proto(resolved), **{**config, **kwargs})

    def __init__(self, proto=None, sequence_length=None, **kwargs):
        super().__init__(**kwargs)
        # Keep Keras from turning strings into backend tensors, and allow Python strings as
        # positional arguments (what KerasHub's preprocessing layers do too).
        self._convert_input_args = False
        self._allow_non_tensor_positional_args = True
        self.built = True
        if proto is None:
            raise TypeError("GemmaTokenizer: `proto` is required: a .model file path or its bytes.")
        if sequence_length is not None and (not _is_int(sequence_length) or sequence_length < 1):
            raise ValueError(
                "GemmaTokenizer: `sequence_length` must be a positive integer or None. "
                f"Received: {sequence_length!r}."
            )
        self.sequence_length = None if sequence_length is None else int(sequence_length)
        self._set_proto(proto)

    def _set_proto(self, proto):
        given = f"`proto` ({os.fspath(proto)!r})" if isinstance(proto, (str, os.PathLike)) else (
            "`proto`")
        advice = ("Pass the tokenizer.model of a Gemma checkpoint (or its bytes); if it came "
                  "with a download, download it again.")
        proto = _read_proto(proto)
        try:
            processor = spm.SentencePieceProcessor(model_proto=proto)
        except RuntimeError as e:
            raise ValueError(
                f"GemmaTokenizer: {given} is not a valid SentencePiece model (could not parse "
                f"{len(proto)} bytes: {str(e).strip()}). {advice}"
            ) from None
        # An empty byte string "parses" into an uninitialized processor with no pieces.
        if processor.get_piece_size() == 0:
            raise ValueError(
                f"GemmaTokenizer: {given} is an empty SentencePiece model. {advice}"
            )
        self._proto = proto
        self._sp = processor
        self._tf_tokenizer = None  # built on first graph use
        self._special = {}
        for piece in ("<pad>", "<eos>", "<bos>", "<unk>"):
            self._special[piece] = self._find_piece(piece)
            if self._special[piece] is None:
                raise ValueError(
                    f"GemmaTokenizer: the SentencePiece model has no '{piece}' piece, which every "
                    "Gemma vocabulary has. Is this a Gemma tokenizer.model?"
                )
        for piece in ("<start_of_turn>", "<end_of_turn>"):
            self._special[piece] = self._find_piece(piece)

    def _find_piece(self, piece):
        # piece_to_id answers <unk>'s id for a missing piece, so check the round trip.
        index = self._sp.piece_to_id(piece)
        return index if self._sp.id_to_piece(index) == piece else None

    # Vocabulary.

    def vocabulary_size(self):
        """The number of pieces (ids run from 0 to vocabulary_size() - 1)."""
        return self._sp.get_piece_size()

    def get_vocabulary(self):
        """All pieces, in id order."""
        # Not cached: a Keras layer would wrap a cached list in a tracked list, element by element.
        return self._sp.id_to_piece(list(range(self.vocabulary_size())))

    def id_to_token(self, id):
        """The piece string for an integer id."""
        self._check_ids([id])
        return self._sp.id_to_piece(int(id))

    def token_to_id(self, token):
        """The id of a piece string; unknown pieces give `<unk>`'s id, as in SentencePiece."""
        if isinstance(token, bytes):
            token = token.decode("utf-8")
        if not isinstance(token, str):
            raise TypeError(f"GemmaTokenizer.token_to_id expects a str. Received: {token!r}.")
        return self._sp.piece_to_id(token)

    pad_token_id = _special_id("<pad>", "Id of `<pad>` (0 in Gemma).")
    end_token_id = _special_id("<eos>", "Id of `<eos>` (1 in Gemma).")
    start_token_id = _special_id("<bos>", "Id of `<bos>` (2 in Gemma).")
    unk_token_id = _special_id("<unk>", "Id of `<unk>` (3 in Gemma).")
    start_of_turn_id = _special_id("<start_of_turn>", "106 in Gemma 1/2, 105 in Gemma 3; or None.")
    end_of_turn_id = _special_id("<end_of_turn>", "107 in Gemma 1/2, 106 in Gemma 3; or None.")
    pad_token, end_token, start_token = "<pad>", "<eos>", "<bos>"

    @property
    def special_token_ids(self):
        """Ids that generation output drops, in increasing order: pad, eos and bos.

        The chat turn markers are not among them: KerasHub's Gemma tokenizers keep them in the
        output, where chat code (`response.replace(prompt, "")`, multi-turn transcripts) needs
        them.
        """
        return sorted({self.pad_token_id, self.start_token_id, self.end_token_id})

    # Tokenize / detokenize.

    def call(self, inputs):
        return self.tokenize(inputs)

    def tokenize(self, inputs):
        """Strings -> ids: a 1-D int32 array for one string, lists of ids for a batch (an int32
        array when `sequence_length` is set); tf tensors (ragged for a batch) inside a graph."""
        if _in_tf_graph():
            return self._tokenize_tf(inputs)
        strings, single = _as_strings(_to_python(inputs))
        ids = self._sp.encode(strings) if strings else []
        if self.sequence_length is not None:
            n = self.sequence_length
            ids = np.array([row[:n] + [self.pad_token_id] * (n - len(row)) for row in ids], "int32")
            ids = ids.reshape(len(strings), n)
        return np.asarray(ids[0], dtype="int32") if single else ids

    def detokenize(self, inputs):
        """Ids -> strings: a str for one sequence, a list of str for a batch; tf in a graph."""
        if _in_tf_graph():
            return self._detokenize_tf(inputs)
        inputs = _to_python(inputs)
        if isinstance(inputs, (int, np.generic)):
            inputs = np.asarray(inputs)
        if isinstance(inputs, np.ndarray):
            if inputs.dtype.kind not in "iu":
                raise TypeError(f"GemmaTokenizer.detokenize expects int ids, not {inputs.dtype}")
            if inputs.ndim == 0:
                raise TypeError("GemmaTokenizer.detokenize expects a sequence of ids, not a scalar")
            inputs = inputs.tolist()
        if not isinstance(inputs, (list, tuple)):
            raise TypeError(
                "GemmaTokenizer.detokenize expects a sequence of integer ids or a batch of them. "
                f"Received: {type(inputs).__name__}."
            )
        if all(isinstance(v, (list, tuple, np.ndarray)) for v in inputs) and inputs:
            return [self.detokenize(row) for row in inputs]
        self._check_ids(inputs)
        return self._sp.decode([int(v) for v in inputs])

    def _check_ids(self, ids):
        size = self.vocabulary_size()
        for v in ids:
            if not _is_int(v):
                raise TypeError(f"GemmaTokenizer: token ids must be integers. Received: {v!r}.")
            if not 0 <= v < size:
                raise ValueError(
                    f"GemmaTokenizer: token id {int(v)} is out of range for a vocabulary of "
                    f"{size} pieces (valid ids are 0..{size - 1})."
                )

    # The TensorFlow engine.

    def _tf_sentencepiece(self):
        if self._tf_tokenizer is None:
            tf = _tf_module()
            try:
                import tensorflow_text as tf_text
            except ImportError as e:
                raise ImportError(
                    "GemmaTokenizer: tokenizing inside tf.data / tf.function or on tf tensors "
                    "needs `tensorflow-text` (pip install tensorflow-text)."
                ) from e
            # Build the op's resource eagerly even when first asked from inside a tf.data or
            # tf.function trace, so every later trace captures the same resource.
            with tf.init_scope():
                self._tf_tokenizer = tf_text.SentencepieceTokenizer(self._proto, out_type=tf.int32)
        return self._tf_tokenizer

    def _tokenize_tf(self, inputs):
        tf = _tf_module()
        if not _is_tf_tensor(inputs):
            inputs = tf.convert_to_tensor(inputs)
        if inputs.dtype != tf.string:
            raise TypeError(f"GemmaTokenizer.tokenize expects strings, not {inputs.dtype}.")
        scalar = inputs.shape.rank == 0
        if scalar:
            inputs = tf.expand_dims(inputs, 0)
        ids = self._tf_sentencepiece().tokenize(inputs)
        if self.sequence_length is not None:
            shape = ids.shape.as_list()
            shape[-1] = self.sequence_length
            ids = ids.to_tensor(default_value=self.pad_token_id, shape=shape)
        return ids[0] if scalar else ids

    def _detokenize_tf(self, inputs):
        tf = _tf_module()
        if not _is_tf_tensor(inputs):
            try:
                inputs = tf.convert_to_tensor(inputs)
            except ValueError:  # a ragged Python list
                inputs = tf.ragged.constant(inputs)
        if not inputs.dtype.is_integer:
            raise TypeError(f"GemmaTokenizer.detokenize expects integer ids, not {inputs.dtype}.")
        ids = tf.cast(inputs, "int32")
        flat = ids.flat_values if isinstance(ids, tf.RaggedTensor) else tf.reshape(ids, [-1])
        size = self.vocabulary_size()
        message = f"GemmaTokenizer: token ids must be in 0..{size - 1}"
        # The checks run when the graph runs; they fail with an InvalidArgumentError.
        checks = [
            tf.debugging.assert_non_negative(flat, message=message),
            tf.debugging.assert_less(flat, tf.constant(size, "int32"), message=message),
        ]
        with tf.control_dependencies(checks):
            return self._tf_sentencepiece().detokenize(ids)

    # Chat template.

    def apply_chat_template(self, messages, add_generation_prompt=True):
        """Format chat turns as a Gemma instruction-tuned prompt (without `<bos>`).

        `messages` is a list of `{"role": ..., "content": ...}` with roles "user" and "model"
        (or "assistant") alternating from a user turn, optionally led by one "system" message,
        which Gemma has no turn for: like Google's template, it is folded into the first user
        turn as "system text\\n\\nuser text". Contents are stripped of surrounding whitespace,
        as Google's template does. The preprocessor adds `<bos>` when it tokenizes.

        Example:
        ```python
        tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
        # "<start_of_turn>user\\nHi<end_of_turn>\\n<start_of_turn>model\\n"
        ```
        """
        if self.start_of_turn_id is None or self.end_of_turn_id is None:
            raise ValueError(
                "GemmaTokenizer.apply_chat_template: this vocabulary has no <start_of_turn> / "
                "<end_of_turn> pieces; chat prompts need an instruction-tuned Gemma vocabulary."
            )
        turns = chat_turns(messages)
        text = "".join(f"<start_of_turn>{role}\n{text}<end_of_turn>\n" for role, text in turns)
        if add_generation_prompt:
            text += "<start_of_turn>model\n"
        return text

    # Saving.

    def save_to_preset(self, preset_dir):
        """Writes `tokenizer.model` and its settings into a preset directory, keeping what else
        is there: save the backbone and the tokenizer into one directory, in either order.

        Example:
        >>> backbone.save_to_preset("./my_gemma")
        >>> tokenizer.save_to_preset("./my_gemma")
        >>> keras_gemma.GemmaCausalLM.from_preset("./my_gemma")
        """
        from keras_gemma.checkpoints.preset_parts import save_tokenizer

        return save_tokenizer(preset_dir, self)

    def save_assets(self, dir_path):
        """Write the model file as `tokenizer.model` in `dir_path`; return its path."""
        path = os.path.join(dir_path, TOKENIZER_FILENAME)
        with open(path, "wb") as f:
            f.write(self._proto)
        return path

    def load_assets(self, dir_path):
        self._set_proto(os.path.join(dir_path, TOKENIZER_FILENAME))

    @property
    def proto(self):
        """The serialized SentencePiece model (bytes)."""
        return self._proto

    def get_config(self):
        config = super().get_config()
        # The model bytes travel inside the config (base64 text survives JSON), so a config
        # alone rebuilds the tokenizer, as a saved preset or .keras file needs.
        config["proto_base64"] = base64.b64encode(self._proto).decode("ascii")
        config["sequence_length"] = self.sequence_length
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if isinstance(config.get("proto"), str):
            # A config names no files: loading a saved model must not read paths it was given.
            raise ValueError("GemmaTokenizer.from_config: expected `proto_base64`, got a path.")
        encoded = config.pop("proto_base64", None)
        if encoded is not None:
            config["proto"] = base64.b64decode(encoded)
        return cls(**config)
