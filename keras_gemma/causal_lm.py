"""GemmaCausalLM: logits for training, a KV-cached decoder for generation."""

import math
import warnings

import keras
import numpy as np
from keras import ops

from keras_gemma.checkpoints.preset_cards import PresetMapping
from keras_gemma.generation import get_sampler
from keras_gemma.generation import serialize_sampler
from keras_gemma.generation import batches as token_batches
from keras_gemma.generation.generator import Generator
from keras_gemma.generation.text_stream import TextStream
from keras_gemma.generation.training_data import preprocess_for_training


@keras.saving.register_keras_serializable(package="keras_gemma")
class GemmaCausalLM(keras.Model):
    """A Gemma language model: next-token logits, fine-tuning and generation.

    Calling the model on `{"token_ids", "padding_mask"}` gives logits
    `[batch, sequence, vocabulary]`. `generate()` and `stream()` prefill the prompt in one
    call and then decode one token at a time from a preallocated KV cache, in one compiled
    function per backend (see `keras_gemma.generation.Generator`). With a `preprocessor`,
    `fit()`, `evaluate()`, `predict()` and `generate()` take strings. The model is compiled
    with fine-tuning defaults on construction; `compile()` again to change them.

    Args:
        backbone: a `keras_gemma.GemmaBackbone`.
        preprocessor: a `keras_gemma.GemmaCausalLMPreprocessor`, or None to work on token ids.

    Example:
    ```python
    lm = keras_gemma.GemmaCausalLM(backbone, preprocessor)
    lm.generate("What is Keras?", max_length=64)
    for piece in lm.stream("Tell me a story.", max_length=128):
        print(piece, end="")
    lm.backbone.enable_lora(rank=4)
    lm.fit(["text one", "text two"], batch_size=2, epochs=1)
    # Without a preprocessor, KerasHub's convention: arrays as wide as the output, the
    # padding mask marks each row's prompt.
    lm.generate({"token_ids": ids, "padding_mask": mask}, stop_token_ids=None)
    ```
    """

    def __init__(self, backbone, preprocessor=None, **kwargs):
        inputs = backbone.input
        hidden = backbone(inputs)
        outputs = backbone.token_embedding(hidden, reverse=True)
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)
        # Attached after Model.__init__: the torch backend refuses module attributes before.
        self.backbone = backbone
        self.preprocessor = preprocessor
        self.generator = Generator(self)
        self.compile()

    # Configuration and saving.

    def get_config(self):
        return {
            "backbone": keras.saving.serialize_keras_object(self.backbone),
            "preprocessor": (
                None
                if self.preprocessor is None
                else keras.saving.serialize_keras_object(self.preprocessor)
            ),
            "name": self.name,
            "trainable": self.trainable,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for key in ("backbone", "preprocessor"):
            if isinstance(config.get(key), dict):
                config[key] = keras.saving.deserialize_keras_object(config[key])
        return cls(**config)

    # Training.

    def compile(
        self,
        optimizer="auto",
        loss="auto",
        *,
        weighted_metrics="auto",
        sampler="greedy",
        **kwargs,
    ):
        """Fine-tuning defaults plus the sampler that `generate()` uses.

        Defaults: AdamW (learning rate 2e-5, weight decay 0.01 on kernels only: RMS norm
        scales and the embedding are excluded, as is usual for transformers), sparse
        categorical cross-entropy from logits, and accuracy weighted by the padding mask.

        Args:
            sampler: a name ("greedy", "top_k", "top_p", "random", "beam") or a
                `keras_gemma.generation` sampler object.
        """
        if optimizer == "auto":
            optimizer = keras.optimizers.AdamW(learning_rate=2e-5, weight_decay=0.01)
            optimizer.exclude_from_weight_decay(var_names=["scale", "embeddings"])
        if loss == "auto":
            loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        if weighted_metrics == "auto":
            weighted_metrics = [keras.metrics.SparseCategoricalAccuracy()]
        super().compile(
            optimizer=optimizer, loss=loss, weighted_metrics=weighted_metrics, **kwargs
        )
        self.sampler = get_sampler(sampler)

    def get_compile_config(self):
        config = super().get_compile_config()
        if config is not None:
            config["sampler"] = serialize_sampler(self.sampler)
        return config

    def compile_from_config(self, config):
        config = dict(config)
        sampler = config.pop("sampler", None)
        super().compile_from_config(config)
        if sampler is not None:
            self.sampler = get_sampler(sampler)

    def fit(self, x=None, y=None, batch_size=None, sample_weight=None, **kwargs):
        """`keras.Model.fit`; strings (lists, arrays, tf.data) go through the preprocessor."""
        x, y, sample_weight, batch_size = preprocess_for_training(
            self.preprocessor, x, y, sample_weight, batch_size
        )
        validation = kwargs.get("validation_data")
        if validation is not None:
            kwargs["validation_data"] = self._preprocess_validation(validation)
        return super().fit(x, y, batch_size=batch_size, sample_weight=sample_weight, **kwargs)

    def evaluate(self, x=None, y=None, batch_size=None, sample_weight=None, **kwargs):
        x, y, sample_weight, batch_size = preprocess_for_training(
            self.preprocessor, x, y, sample_weight, batch_size
        )
        return super().evaluate(x, y, batch_size=batch_size, sample_weight=sample_weight, **kwargs)

    def predict(self, x, batch_size=None, **kwargs):
        x, _, _, batch_size = preprocess_for_training(self.preprocessor, x, None, None, batch_size)
        if isinstance(x, tuple):  # (x, y, sample_weight) from the preprocessor
            x = x[0]
        return super().predict(x, batch_size=batch_size, **kwargs)

    def _preprocess_validation(self, data):
        if isinstance(data, tuple) and len(data) in (2, 3):
            return data
        x, y, sample_weight, _ = preprocess_for_training(self.preprocessor, data, None, None, None)
        return x if y is None else (x, y, sample_weight)

    # Presets and export.

    presets = PresetMapping()

    @classmethod
    def from_preset(cls, preset, dtype=None, sequence_length=None, load_weights=True):
        """A GemmaCausalLM with its backbone, tokenizer and preprocessor from one handle.

        `preset` is a name from `keras_gemma.list_presets()`, a local directory (keras_gemma,
        KerasHub or transformers format), a .gguf file, `kaggle://...` or `hf://...`.

        Example:
        >>> lm = GemmaCausalLM.from_preset("gemma3_270m", dtype="float32")
        >>> lm.generate("The capital of France is", max_length=16)
        """
        from keras_gemma.checkpoints.loader import load_backbone, resolve
        from keras_gemma.preprocessor import GemmaCausalLMPreprocessor

        resolved = resolve(preset)
        backbone = load_backbone(resolved, dtype=dtype, load_weights=load_weights)
        try:
            preprocessor = GemmaCausalLMPreprocessor.from_preset(
                resolved, sequence_length=sequence_length
            )
        except FileNotFoundError as error:
            warnings.warn(f"{error} The model works on token ids only (preprocessor=None).")
            preprocessor = None
        return cls(backbone, preprocessor)

    def save_to_preset(self, preset_dir):
        """Writes backbone, tokenizer and preprocessor settings as a keras_gemma preset.

        Example:
        >>> lm.save_to_preset("./my_gemma")
        >>> GemmaCausalLM.from_preset("./my_gemma")
        """
        from keras_gemma.checkpoints.preset_format import save_preset

        preprocessor = self.preprocessor
        settings = None
        proto = None
        if preprocessor is not None:
            proto = preprocessor.tokenizer.proto
            settings = {
                "sequence_length": preprocessor.sequence_length,
                "add_start_token": preprocessor.add_start_token,
                "add_end_token": preprocessor.add_end_token,
            }
        return save_preset(
            preset_dir,
            self.backbone,
            tokenizer_proto=proto,
            preprocessor_config=settings,
            task_config={},
            metadata={"parameter_count": self.backbone.count_params()},
        )

    def export(self, path, max_length=512, sampler="greedy"):
        """A TF SavedModel for TF Serving; see `keras_gemma.export_saved_model`."""
        from keras_gemma.export import export_saved_model

        return export_saved_model(self, path, max_length=max_length, sampler=sampler)

    def quantize(self, mode=None, **kwargs):
        """Keras' `Model.quantize` (e.g. "int8"); compiled generate functions are rebuilt."""
        super().quantize(mode, **kwargs)
        self.generator.reset()

    # The cached forward pass.

    def empty_cache(self, batch_size, max_length):
        """A zero KV cache `[batch, num_layers, 2, max_length, kv_heads, head_dim]`."""
        backbone = self.backbone
        shape = (
            batch_size,
            backbone.num_layers,
            2,
            max_length,
            backbone.num_key_value_heads,
            backbone.head_dim,
        )
        return ops.zeros(shape, dtype=backbone.compute_dtype)

    def call_with_cache(self, token_ids, cache, cache_update_index, padding_mask=None):
        """Runs `token_ids` [batch, new] at positions `cache_update_index...`, updating `cache`.

        Prefill is a call with the prompt and `cache_update_index=0`; each decode step is a
        call with one token. Keys are the cache's positions: causal and sliding-window masks
        come from the positions, so entries past the current position are never read.

        Args:
            token_ids: int [batch, new].
            cache: `[batch, num_layers, 2, max_length, kv_heads, head_dim]` from `empty_cache`.
            cache_update_index: int or int scalar tensor, the position of `token_ids[:, 0]`.
            padding_mask: optional [batch, max_length] mask over the cache positions (keys);
                positions marked 0 are never attended to.

        Returns:
            `(logits [batch, new, vocabulary], hidden [batch, new, hidden_dim], cache)`.
        """
        caches = [cache[:, i, ...] for i in range(self.backbone.num_layers)]
        hidden, caches = self.hidden_with_cache(token_ids, caches, cache_update_index, padding_mask)
        logits = self.backbone.token_embedding(hidden, reverse=True)
        return logits, hidden, ops.stack(caches, axis=1)

    def hidden_with_cache(self, token_ids, caches, cache_update_index, padding_mask=None):
        """`call_with_cache` on a list of per-layer caches `[batch, 2, max_length, kv, hd]`,
        without the (vocabulary-sized) logits: the generation loop's building block."""
        backbone = self.backbone
        x = backbone.token_embedding(token_ids)
        x = x * ops.cast(math.sqrt(backbone.hidden_dim), x.dtype)
        updated = []
        for block, cache in zip(backbone.transformer_layers, caches):
            x, cache = block(
                x, padding_mask=padding_mask, cache=cache, cache_update_index=cache_update_index
            )
            updated.append(cache)
        return backbone.final_normalization(x), updated

    # Generation.

    def _stop_token_ids(self, stop_token_ids):
        if isinstance(stop_token_ids, str) and stop_token_ids == "auto":
            if self.preprocessor is None:
                raise ValueError(
                    'stop_token_ids="auto" needs a preprocessor (it stops at the tokenizer\'s '
                    "<eos> and <end_of_turn>). Without one, pass stop_token_ids=None to "
                    "generate until max_length, or a tuple of token ids."
                )
            tokenizer = self.preprocessor.tokenizer
            # Instruction-tuned Gemma ends its turn with <end_of_turn> rather than <eos>; a
            # vocabulary that has the piece gets both (as KerasHub's Gemma 3 does).
            ids = [tokenizer.end_token_id, getattr(tokenizer, "end_of_turn_id", None)]
            return tuple(int(i) for i in ids if i is not None)
        if stop_token_ids is None:
            return ()
        return tuple(sorted({int(i) for i in stop_token_ids}))

    def _pad_token_id(self):
        if self.preprocessor is not None:
            return int(self.preprocessor.tokenizer.pad_token_id)
        return 0

    def generate(self, inputs, max_length=None, stop_token_ids="auto", strip_prompt=False):
        """Continues each prompt until a stop token or `max_length` tokens.

        Args:
            inputs: with a preprocessor, a string, a list of strings or a `tf.data.Dataset`
                of strings (generated batch by batch). Without one (or to skip it), a dict
                `{"token_ids", "padding_mask"}` of arrays as wide as the output, where the
                padding mask marks each row's prompt (without a preprocessor, also a
                dataset of such dicts).
            max_length: total length, prompt included (default: the preprocessor's
                `sequence_length`; without a preprocessor, the width of the arrays).
            stop_token_ids: "auto" (`<eos>`, and `<end_of_turn>` where the vocabulary has
                it), None (never stop early), or a sequence of ids. Each row stops on its own.
            strip_prompt: return only the generated continuation.

        Returns:
            Strings in the shape of `inputs` with a preprocessor; otherwise a dict with the
            same keys and shape, the padding mask extended over the generated tokens.
        """
        stop_ids = self._stop_token_ids(stop_token_ids)
        batches, single, is_dataset = self._generate_batches(inputs, max_length)
        outputs = [self._generate_batch(batch, stop_ids, strip_prompt) for batch in batches]
        if self.preprocessor is not None and not isinstance(inputs, dict):
            texts = [self.preprocessor.generate_postprocess(o) for o in outputs]
            texts = [[t] if isinstance(t, str) else list(t) for t in texts]
            flat = [t for group in texts for t in group]
            return flat[0] if single else flat
        if is_dataset:
            return {k: np.concatenate([o[k] for o in outputs]) for k in outputs[0]}
        return outputs[0]

    def _generate_batches(self, inputs, max_length):
        """The input as a list (or iterator) of `{"token_ids", "padding_mask"}` numpy dicts."""
        is_dataset = hasattr(inputs, "as_numpy_iterator")  # a tf.data.Dataset
        batches = inputs.as_numpy_iterator() if is_dataset else [inputs]
        single = False
        if self.preprocessor is None or isinstance(inputs, dict):
            # Token ids in, token ids out (also with a preprocessor attached).
            packed = [token_batches.as_token_batch(b, max_length) for b in batches]
            return packed, False, is_dataset
        if isinstance(inputs, (str, bytes)):
            single = True
            batches = [[inputs]]
        packed = []
        for batch in batches:
            if isinstance(batch, np.ndarray) and batch.dtype.kind in "SO":
                batch = [b.decode("utf-8") if isinstance(b, bytes) else b for b in batch.tolist()]
            packed.append(
                token_batches.as_token_batch(
                    self.preprocessor.generate_preprocess(batch, sequence_length=max_length), None
                )
            )
        return packed, single, is_dataset

    def _generate_batch(self, batch, stop_ids, strip_prompt):
        prompt_mask = batch["padding_mask"].astype(bool)
        token_ids, padding_mask = self.generator.generate(
            batch["token_ids"],
            prompt_mask,
            sampler=self.sampler,
            stop_token_ids=stop_ids,
            pad_token_id=self._pad_token_id(),
        )
        if strip_prompt:
            token_ids, padding_mask = token_batches.strip_prompt(
                token_ids, padding_mask, prompt_mask
            )
        return {"token_ids": token_ids, "padding_mask": padding_mask}

    def stream(self, prompt, max_length=None, stop_token_ids="auto"):
        """Yields the continuation of one prompt as text pieces while tokens are produced.

        Pieces are cut at character boundaries: a character split over several byte tokens
        comes out whole once its last byte arrives. Joined, the pieces are the text that
        `generate(prompt, strip_prompt=True)` returns (with the same greedy sampler).

        Example:
        >>> for piece in lm.stream("The three laws of robotics are", max_length=64):
        ...     print(piece, end="", flush=True)
        """
        if self.preprocessor is None:
            raise ValueError("stream() needs a preprocessor to turn tokens into text.")
        if not isinstance(prompt, str):
            raise TypeError(f"stream() takes one prompt string; got {type(prompt).__name__}.")
        stop_ids = self._stop_token_ids(stop_token_ids)
        batch = token_batches.as_token_batch(
            self.preprocessor.generate_preprocess([prompt], sequence_length=max_length), None
        )
        text = TextStream(self.preprocessor.tokenizer)
        for token in self.generator.stream(
            batch["token_ids"],
            batch["padding_mask"].astype(bool),
            sampler=self.sampler,
            stop_token_ids=stop_ids,
            pad_token_id=self._pad_token_id(),
        ):
            piece = text.add(token)
            if piece:
                yield piece
        piece = text.flush()
        if piece:
            yield piece

