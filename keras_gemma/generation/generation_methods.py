"""`generate()` and `stream()`: the text-in, text-out face of `GemmaCausalLM`."""

import numpy as np

from keras_gemma.generation import arguments
from keras_gemma.generation import batches as token_batches
from keras_gemma.generation import prompts
from keras_gemma.generation.text_stream import TextStream


class GenerationMethods:
    """The generation methods of a causal LM, mixed into `GemmaCausalLM`.

    The model supplies `preprocessor`, `sampler` (set by `compile()`) and `generator` (a
    `keras_gemma.generation.Generator`). Kept apart from causal_lm.py so that the model file
    holds the model: training, presets and the cached forward pass.

    Example:
    >>> lm = keras_gemma.GemmaCausalLM.from_preset("gemma3_270m")
    >>> lm.generate(["Hi", "Bye"], max_length=16)        # GenerationMethods.generate
    """

    def _stop_token_ids(self, stop_token_ids):
        return prompts.stop_token_ids(self.preprocessor, stop_token_ids)

    def _pad_token_id(self):
        if self.preprocessor is not None:
            return int(self.preprocessor.tokenizer.pad_token_id)
        return 0

    def generate(self, inputs, max_length=None, stop_token_ids="auto", strip_prompt=False):
        """Continues each prompt until a stop token or `max_length` tokens.

        Args:
            inputs: with a preprocessor, a string, a list of strings, KerasHub's Gemma 3
                form `{"prompts": ...}`, or a `tf.data.Dataset` of strings (generated batch
                by batch). Without one (or to skip it), a dict
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
        inputs = prompts.unwrap_prompts(inputs)
        self._check_arguments("generate()", max_length, stop_token_ids)
        if self.preprocessor is not None:
            arguments.check_prompts(inputs, "generate()")
        stop_ids = self._stop_token_ids(stop_token_ids)
        batches, single, is_dataset = prompts.generate_batches(self.preprocessor, inputs, max_length)
        outputs = [self._generate_batch(batch, stop_ids, strip_prompt) for batch in batches]
        if self.preprocessor is not None and not isinstance(inputs, dict):
            texts = [self.preprocessor.generate_postprocess(o) for o in outputs]
            texts = [[t] if isinstance(t, str) else list(t) for t in texts]
            flat = [t for group in texts for t in group]
            return flat[0] if single else flat
        if is_dataset:
            return {k: np.concatenate([o[k] for o in outputs]) for k in outputs[0]}
        return outputs[0]

    def _check_arguments(self, caller, max_length, stop_token_ids):
        arguments.check_max_length(max_length, caller)
        arguments.check_stop_token_ids(
            stop_token_ids, self.backbone.vocabulary_size, caller
        )

    def _generate_batch(self, batch, stop_ids, strip_prompt):
        arguments.check_token_batch(batch, self.backbone.vocabulary_size, "generate()")
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
        `generate(prompt, strip_prompt=True)` returns (with the same greedy sampler), less
        the stop token: where a reply ends at `<end_of_turn>`, `generate` keeps the marker
        (as KerasHub does) and `stream` does not yield it.

        Example:
        >>> for piece in lm.stream("The three laws of robotics are", max_length=64):
        ...     print(piece, end="", flush=True)
        """
        if self.preprocessor is None:
            raise ValueError("stream() needs a preprocessor to turn tokens into text.")
        if not isinstance(prompt, str):
            raise TypeError(
                f"stream() takes one prompt string; got {type(prompt).__name__}. For a batch, "
                "call generate(), or stream() each prompt in turn."
            )
        self._check_arguments("stream()", max_length, stop_token_ids)
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
