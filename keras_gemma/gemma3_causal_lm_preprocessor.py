"""Gemma3CausalLMPreprocessor: KerasHub's Gemma 3 text preprocessing on our preprocessor."""

import math

import keras
import numpy as np

from keras_gemma.gemma3_backbone import TEXT_ONLY
from keras_gemma.gemma3_tokenizer import Gemma3Tokenizer
from keras_gemma.preprocessor import GemmaCausalLMPreprocessor
from keras_gemma.text_inputs import in_tf_graph


def _text_fields(x, need_responses):
    """(prompts, responses or None) of a `{"prompts", "responses", "images"}` dict."""
    if x.get("images") is not None:
        raise ValueError(f"Gemma3CausalLMPreprocessor: got `images`. {TEXT_ONLY}")
    if "prompts" not in x or (need_responses and "responses" not in x):
        wanted = '"prompts" and "responses"' if need_responses else '"prompts"'
        raise ValueError(
            f"Gemma3CausalLMPreprocessor: a dict input needs the keys {wanted}; got "
            f"{sorted(x)}."
        )
    return x["prompts"], x.get("responses")


def _round_robin(prompt_length, response_length, budget):
    """How many prompt and response tokens fit in `budget`, given out one at a time to each
    segment in turn, the prompt first (tensorflow_text's RoundRobinTrimmer, as KerasHub)."""
    kept_prompt = min(prompt_length, max(math.ceil(budget / 2), budget - response_length))
    return kept_prompt, min(response_length, budget - kept_prompt)


@keras.saving.register_keras_serializable(package="keras_gemma")
class Gemma3CausalLMPreprocessor(GemmaCausalLMPreprocessor):
    """KerasHub's `Gemma3CausalLMPreprocessor`, for text.

    Everything `GemmaCausalLMPreprocessor` does (strings in, same defaults:
    `sequence_length=1024`, `<bos>` first, `<eos>` last for training), plus KerasHub's Gemma 3
    text behaviour:
    - a `{"prompts", "responses"}` dict packs `<bos> prompt response <eos>` (the two trimmed
      in turn when too long) and weights the loss on the response (and `<eos>`) only;
    - `generate_preprocess` takes `{"prompts"}` (optionally `"responses"`, which generation
      then continues);
    - `generate_postprocess` removes `<pad>`, `<bos>`, `<eos>`, `<img>` and `<end_of_image>`,
      and keeps `<start_of_image>` and the chat turn markers.

    Text only: an `image_converter` or an `"images"` input raises a ValueError.
    `max_images_per_prompt` and `num_vision_tokens_per_image` are kept in the config (KerasHub
    presets store them) and have no effect without images.

    Args:
        tokenizer: a `keras_gemma.Gemma3Tokenizer` (or `GemmaTokenizer`).
        image_converter: must be None.
        sequence_length, add_start_token, add_end_token: as in `GemmaCausalLMPreprocessor`.
        max_images_per_prompt, num_vision_tokens_per_image: KerasHub's, unused.

    Example:
    ```python
    preprocessor = keras_gemma.Gemma3CausalLMPreprocessor.from_preset(
        "gemma3_instruct_1b", sequence_length=128)
    x, y, sample_weight = preprocessor(
        {"prompts": ["What is Keras?"], "responses": ["A deep learning API."]})
    preprocessor.generate_preprocess({"prompts": ["What is Keras?"]})
    ```
    """

    def __init__(
        self,
        tokenizer,
        image_converter=None,
        sequence_length=1024,
        add_start_token=True,
        add_end_token=True,
        max_images_per_prompt=2,
        num_vision_tokens_per_image=256,
        **kwargs,
    ):
        if image_converter is not None:
            raise ValueError(f"Gemma3CausalLMPreprocessor: got an image_converter. {TEXT_ONLY}")
        super().__init__(
            tokenizer,
            sequence_length=sequence_length,
            add_start_token=add_start_token,
            add_end_token=add_end_token,
            **kwargs,
        )
        self.image_converter = None
        self.max_images_per_prompt = max_images_per_prompt
        self.num_vision_tokens_per_image = num_vision_tokens_per_image
        self.text_only_model = True

    @classmethod
    def from_preset(cls, preset, sequence_length=None, **kwargs):
        """The preprocessor of a Gemma 3 preset: its tokenizer and, where saved, its settings.

        Example:
        >>> Gemma3CausalLMPreprocessor.from_preset("gemma3_270m", sequence_length=256)
        """
        from keras_gemma.checkpoints.loader import preset_metadata, resolve

        resolved = resolve(preset)
        saved = preset_metadata(resolved).get("preprocessor") or {}
        settings = {
            key: saved[key]
            for key in ("sequence_length", "add_start_token", "add_end_token")
            if key in saved
        }
        if sequence_length is not None:
            settings["sequence_length"] = sequence_length
        settings.update(kwargs)
        # The packing length is the preprocessor's own; a tokenizer saved with one gets none.
        return cls(Gemma3Tokenizer.from_preset(resolved, sequence_length=None), **settings)

    def call(self, x, y=None, sample_weight=None, sequence_length=None):
        if not isinstance(x, dict):
            return super().call(x, y, sample_weight, sequence_length=sequence_length)
        prompts, responses = _text_fields(x, need_responses=True)
        length = self._length(sequence_length)
        # One extra position: the inputs and the labels are the same ids shifted by one.
        ids, mask, response = self._pack_pair(
            prompts, responses, length + 1, self.add_start_token, self.add_end_token
        )
        features = {"token_ids": ids[..., :-1], "padding_mask": mask[..., :-1]}
        packed = keras.utils.pack_x_y_sample_weight(features, ids[..., 1:], response[..., 1:])
        return self._outputs(packed)  # backend tensors, as for strings

    def generate_preprocess(self, x, sequence_length=None):
        """Strings, or `{"prompts"[, "responses"]}`, -> `{"token_ids", "padding_mask"}`."""
        if not isinstance(x, dict):
            return super().generate_preprocess(x, sequence_length=sequence_length)
        prompts, responses = _text_fields(x, need_responses=False)
        if responses is None:
            return super().generate_preprocess(prompts, sequence_length=sequence_length)
        # No end token: generation continues the response.
        ids, mask, _ = self._pack_pair(
            prompts, responses, self._length(sequence_length), self.add_start_token, False
        )
        return self._outputs({"token_ids": ids, "padding_mask": mask})

    def _ids_to_strip(self):
        # KerasHub's Gemma 3 keeps <start_of_image> (a prompt writes it) and strips its other
        # special tokens.
        kept = getattr(self.tokenizer, "start_of_image_token_id", -1)
        return [i for i in self.tokenizer.special_token_ids if i != kept]

    def _pack_pair(self, prompts, responses, length, add_start, add_end):
        """`<bos> prompt response <eos>` right-padded to `length`: (ids, mask, response mask).

        The response mask covers the response and the end token, as KerasHub's segment ids.
        """
        start = [self.tokenizer.start_token_id] if add_start else []
        end = [self.tokenizer.end_token_id] if add_end else []
        budget = max(length - len(start) - len(end), 0)
        if in_tf_graph():
            return self._pack_pair_tf(prompts, responses, length, start, end, budget)
        prompt_rows = self.tokenizer.tokenize(prompts)
        response_rows = self.tokenizer.tokenize(responses)
        single = isinstance(prompt_rows, np.ndarray)
        if single:
            prompt_rows, response_rows = [prompt_rows.tolist()], [response_rows.tolist()]
        if len(prompt_rows) != len(response_rows):
            raise ValueError(
                f"Gemma3CausalLMPreprocessor: {len(prompt_rows)} prompts but "
                f"{len(response_rows)} responses."
            )
        ids = np.full((len(prompt_rows), length), self.tokenizer.pad_token_id, dtype="int32")
        mask = np.zeros((len(prompt_rows), length), dtype=bool)
        response_mask = np.zeros((len(prompt_rows), length), dtype=bool)
        for i, (prompt, response) in enumerate(zip(prompt_rows, response_rows)):
            kept_prompt, kept_response = _round_robin(len(prompt), len(response), budget)
            packed = start + prompt[:kept_prompt] + response[:kept_response] + end
            ids[i, : len(packed)] = packed
            mask[i, : len(packed)] = True
            response_mask[i, len(start) + kept_prompt : len(packed)] = True
        if single:
            return ids[0], mask[0], response_mask[0]
        return ids, mask, response_mask

    def _pack_pair_tf(self, prompts, responses, length, start, end, budget):
        import tensorflow as tf
        import tensorflow_text as tf_text

        prompt_rows = self.tokenizer.tokenize(prompts)
        response_rows = self.tokenizer.tokenize(responses)
        single = not isinstance(prompt_rows, tf.RaggedTensor)
        if single:
            prompt_rows = tf.RaggedTensor.from_tensor(prompt_rows[tf.newaxis])
            response_rows = tf.RaggedTensor.from_tensor(response_rows[tf.newaxis])
        prompt_rows, response_rows = tf_text.RoundRobinTrimmer(budget).trim(
            [prompt_rows, response_rows]
        )
        batch = prompt_rows.nrows()

        def column(value):
            return tf.RaggedTensor.from_tensor(tf.fill([batch, 1], value))

        parts = [column(v) for v in start] + [prompt_rows, response_rows]
        parts += [column(v) for v in end]
        in_response = [tf.zeros_like(part, dtype="bool") for part in parts[: len(start) + 1]]
        in_response += [tf.ones_like(part, dtype="bool") for part in parts[len(start) + 1 :]]
        rows = tf.concat(parts, axis=1)
        shape = [None, length]
        ids = rows.to_tensor(default_value=self.tokenizer.pad_token_id, shape=shape)
        mask = tf.ones_like(rows, dtype="bool").to_tensor(default_value=False, shape=shape)
        response_mask = tf.concat(in_response, axis=1).to_tensor(default_value=False, shape=shape)
        if single:
            return ids[0], mask[0], response_mask[0]
        return ids, mask, response_mask

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "image_converter": None,
                "max_images_per_prompt": self.max_images_per_prompt,
                "num_vision_tokens_per_image": self.num_vision_tokens_per_image,
            }
        )
        return config
