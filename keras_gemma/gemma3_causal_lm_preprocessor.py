"""Gemma3CausalLMPreprocessor: KerasHub's Gemma 3 text preprocessing on our preprocessor."""

import keras

from keras_gemma.gemma3_backbone import TEXT_ONLY
from keras_gemma.gemma3_tokenizer import Gemma3Tokenizer
from keras_gemma.preprocessor import GemmaCausalLMPreprocessor


@keras.saving.register_keras_serializable(package="keras_gemma")
class Gemma3CausalLMPreprocessor(GemmaCausalLMPreprocessor):
    """KerasHub's `Gemma3CausalLMPreprocessor`, for text.

    Everything `GemmaCausalLMPreprocessor` does (strings in, same defaults:
    `sequence_length=1024`, `<bos>` first, `<eos>` last for training), plus KerasHub's Gemma 3
    text behaviour:
    - a `{"prompts", "responses"}` dict packs `<bos> prompt response <eos>` (the two trimmed
      in turn when too long) and weights the loss on the response (and `<eos>`) only (this,
      chat conversations and `packing` are `GemmaCausalLMPreprocessor`'s);
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

    def generate_preprocess(self, x, sequence_length=None):
        """Strings, or `{"prompts"[, "responses"]}`, -> `{"token_ids", "padding_mask"}`."""
        if not isinstance(x, dict):
            return super().generate_preprocess(x, sequence_length=sequence_length)
        prompts, responses = self._text_fields(x, need_responses=False)
        if responses is None:
            return super().generate_preprocess(prompts, sequence_length=sequence_length)
        # No end token: generation continues the response.
        start = [self.tokenizer.start_token_id] if self.add_start_token else []
        ids, mask, _ = self._pack_pair(prompts, responses, self._length(sequence_length), start, [])
        return self._outputs({"token_ids": ids, "padding_mask": mask})

    def _ids_to_strip(self):
        # KerasHub's Gemma 3 keeps <start_of_image> (a prompt writes it) and strips its other
        # special tokens.
        kept = getattr(self.tokenizer, "start_of_image_token_id", -1)
        return [i for i in self.tokenizer.special_token_ids if i != kept]

    def _text_fields(self, x, need_responses):
        if x.get("images") is not None:
            raise ValueError(f"Gemma3CausalLMPreprocessor: got `images`. {TEXT_ONLY}")
        return super()._text_fields(x, need_responses)

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
