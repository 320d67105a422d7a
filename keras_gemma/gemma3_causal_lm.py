"""Gemma3CausalLM: KerasHub's Gemma 3 task (text only) on our GemmaCausalLM."""

import keras
import numpy as np

from keras_gemma.backbone import GemmaBackbone
from keras_gemma.causal_lm import GemmaCausalLM
from keras_gemma.gemma3_backbone import TEXT_ONLY
from keras_gemma.gemma3_backbone import Gemma3Backbone
from keras_gemma.gemma3_causal_lm_preprocessor import Gemma3CausalLMPreprocessor
from keras_gemma.text_inputs import to_python


def _is_prompt_dict(inputs):
    return isinstance(inputs, dict) and "prompts" in inputs


def _as_text(value):
    return value.decode("utf-8") if isinstance(value, bytes) else value


@keras.saving.register_keras_serializable(package="keras_gemma")
class Gemma3CausalLM(GemmaCausalLM):
    """KerasHub's `Gemma3CausalLM` for text: `GemmaCausalLM` with Gemma 3's classes.

    The constructor takes `(preprocessor, backbone)` in KerasHub's order. `from_preset` (that of
    `GemmaCausalLM`: names, directories, .gguf files, hub handles; `preprocessor=`, `compile=`
    and the like go to the constructor) builds a `Gemma3Backbone` and a
    `Gemma3CausalLMPreprocessor`. `generate()` takes what
    `GemmaCausalLM.generate` takes and, as KerasHub's Gemma 3, a dict
    `{"prompts": str or list of str}` (optionally `"responses"`, which generation continues;
    a `tf.data.Dataset` of such dicts too). It stops at `<eos>` and `<end_of_turn>` by default.
    Text only: `"images"` raise a ValueError.

    Args:
        preprocessor: a `keras_gemma.Gemma3CausalLMPreprocessor`, or None.
        backbone: a `keras_gemma.Gemma3Backbone` (any `GemmaBackbone` works).
        **kwargs: as in `GemmaCausalLM` (`compile=False`, `name=`).

    Example:
    ```python
    lm = keras_gemma.Gemma3CausalLM.from_preset("gemma3_instruct_1b")
    lm.generate({"prompts": ["What is Keras?"]}, max_length=64)
    lm.generate("What is Keras?", max_length=64)
    ```
    """

    def __init__(self, preprocessor, backbone, **kwargs):
        if isinstance(preprocessor, GemmaBackbone):
            raise TypeError(
                "Gemma3CausalLM takes (preprocessor, backbone), in KerasHub's order; got a "
                "backbone first. Pass them by name: Gemma3CausalLM(backbone=..., "
                "preprocessor=...)."
            )
        super().__init__(backbone=backbone, preprocessor=preprocessor, **kwargs)

    # What GemmaCausalLM.from_preset builds for this class.
    backbone_cls = Gemma3Backbone
    preprocessor_cls = Gemma3CausalLMPreprocessor

    def save_to_preset(self, preset_dir):
        """Writes a keras_gemma preset, which `Gemma3CausalLM.from_preset` and
        `GemmaCausalLM.from_preset` read.

        Example:
        >>> lm.save_to_preset("./my_gemma3")
        """
        if isinstance(self.backbone, Gemma3Backbone):
            with self.backbone.saving_as_gemma_backbone():
                return super().save_to_preset(preset_dir)
        return super().save_to_preset(preset_dir)

    def generate(self, inputs, max_length=None, stop_token_ids="auto", strip_prompt=False):
        """`GemmaCausalLM.generate`, also taking `{"prompts"[, "responses"]}` dicts.

        Example:
        >>> lm.generate({"prompts": ["The sky is", "Keras is"]}, max_length=32)
        """
        options = dict(max_length=max_length, stop_token_ids=stop_token_ids,
                       strip_prompt=strip_prompt)
        if _is_prompt_dict(inputs):
            return self._generate_prompts(inputs, **options)
        if _is_prompt_dict(getattr(inputs, "element_spec", None)):  # a tf.data.Dataset
            texts = []
            for batch in inputs.as_numpy_iterator():
                generated = self._generate_prompts(batch, **options)
                texts += [generated] if isinstance(generated, str) else generated
            return texts
        return super().generate(inputs, **options)

    def _generate_prompts(self, inputs, max_length, **options):
        if self.preprocessor is None:
            raise ValueError(
                'generate({"prompts": ...}) needs a preprocessor; without one, pass '
                '{"token_ids", "padding_mask"}.'
            )
        if inputs.get("images") is not None:
            raise ValueError(f"Gemma3CausalLM.generate: got `images`. {TEXT_ONLY}")
        fields = {}
        for key in ("prompts", "responses"):
            if key not in inputs:
                continue
            value = to_python(inputs[key])  # tf or backend tensors -> numpy
            value = _as_text(value.tolist() if isinstance(value, np.ndarray) else value)
            if key == "prompts":
                single = isinstance(value, str)
            fields[key] = [value] if isinstance(value, str) else [_as_text(v) for v in value]
        tokens = self.preprocessor.generate_preprocess(fields, sequence_length=max_length)
        # A token dict in gives a token dict out; the text comes back here.
        outputs = super().generate(tokens, **options)
        texts = self.preprocessor.generate_postprocess(outputs)
        return texts[0] if single else texts
