"""The tf.functions behind the exported `generate` and `logits` signatures."""

import tensorflow as tf
from keras import ops


def _sentencepiece_ops():
    # tensorflow-text's generated op wrappers (the module its tokenizer class uses).
    from tensorflow_text.python.ops import sentencepiece_tokenizer

    return sentencepiece_tokenizer.gen_sentencepiece_tokenizer


class SentencePieceModel(tf.Module):
    """tensorflow-text's SentencePiece ops on a resource that the SavedModel tracks.

    KerasHub's export loses the tokenizer (its resource is not tracked, keras-hub #1629).
    Here the resource is a tracked `TrackableResource`, re-created when the SavedModel is
    loaded. tensorflow-text's op takes the model as an attribute, not an input, so the bytes
    live in the graph; the same file is also kept as the asset `tokenizer.model`, so a
    SavedModel says which tokenizer it carries.
    """

    def __init__(self, proto_file):
        super().__init__(name="sentencepiece")
        self.asset = tf.saved_model.Asset(proto_file)
        with open(proto_file, "rb") as file:
            self.resource = _SentencePieceResource(file.read())

    def tokenize(self, texts):
        """Ragged int32 ids of a string vector (no <bos>, no <eos>)."""
        values, row_splits = _sentencepiece_ops().sentencepiece_tokenize_op(
            self.resource.resource_handle, texts, 0, 0.0, False, False, False, tf.int32
        )
        return tf.RaggedTensor.from_row_splits(values, row_splits)

    def detokenize(self, ids):
        """Strings from ragged int32 ids."""
        return _sentencepiece_ops().sentencepiece_detokenize_op(
            self.resource.resource_handle, ids.flat_values, ids.row_splits, False, False, False
        )


class _SentencePieceResource(tf.saved_model.experimental.TrackableResource):
    def __init__(self, proto):
        self._proto = proto
        super().__init__()
        _ = self.resource_handle

    def _create_resource(self):
        return _sentencepiece_ops().sentencepiece_op(model=self._proto)


def build_signatures(causal_lm, proto_file, width, default_max_length, sampler):
    """(module to save, {signature name: concrete function})."""
    from keras_gemma.generation.sampler import is_stop_token

    tokenizer = causal_lm.preprocessor.tokenizer
    backbone = causal_lm.backbone
    generator = causal_lm.generator
    start_id = int(tokenizer.start_token_id)
    pad_id = int(tokenizer.pad_token_id)
    stop_ids = tuple(causal_lm._stop_token_ids("auto"))
    special_ids = tuple(int(i) for i in tokenizer.special_token_ids)

    module = tf.Module()
    module.model = causal_lm
    module.variables_to_keep = [v.value for v in causal_lm.weights]
    module.sentencepiece = SentencePieceModel(proto_file)
    body = generator._body(generator._decode, sampler, stop_ids, pad_id)

    def decode(tokens, prompt_mask, max_length):
        batch = tf.shape(tokens)[0]
        start = tf.maximum(1, tf.reduce_min(tf.reduce_sum(tf.cast(prompt_mask, tf.int32), 1)))
        start = tf.where(batch > 0, start, 1)
        caches = [
            tf.zeros(
                tf.stack([batch, 2, width, backbone.num_key_value_heads, backbone.head_dim]),
                backbone.compute_dtype,
            )
            for _ in range(backbone.num_layers)
        ]
        _, caches = causal_lm.hidden_with_cache(tokens[:, : start - 1], caches, 0)
        done = tf.zeros(tf.stack([batch]), tf.bool)
        scores = tf.zeros(tf.stack([batch]), tf.float32)
        key = tf.random.uniform([2], minval=-(2**31), maxval=2**31 - 1, dtype=tf.int32)

        def cond(tokens, caches, index, done, scores):
            return tf.logical_and(index < max_length, tf.logical_not(tf.reduce_all(done)))

        def step(tokens, caches, index, done, scores):
            tokens, caches, done, scores = body(
                tokens, caches, index, prompt_mask, done, scores, key
            )
            return tokens, caches, index + 1, done, scores

        tokens, _, end, done, scores = tf.while_loop(
            cond, step, (tokens, caches, start, done, scores), maximum_iterations=width
        )
        tokens, done = sampler.finalize(tokens, done, scores)
        positions = tf.range(width)[None, :]
        generated = tf.logical_and(positions < end, tf.logical_not(prompt_mask))
        stops = tf.cast(tf.logical_and(generated, is_stop_token(tokens, stop_ids)), tf.int32)
        after_stop = tf.cumsum(stops, axis=1) - stops > 0
        keep = tf.logical_and(tf.logical_or(prompt_mask, generated), tf.logical_not(after_stop))
        return tokens, keep

    @tf.function(
        input_signature=[
            tf.TensorSpec([None], tf.string, name="prompts"),
            tf.TensorSpec([], tf.int32, name="max_length"),
        ]
    )
    def generate_with_length(prompts, max_length):
        max_length = tf.clip_by_value(max_length, 2, default_max_length)
        # Keep each prompt's first max_length tokens, <bos> included, as generate() does.
        ids = module.sentencepiece.tokenize(prompts)[:, : max_length - 1]
        batch = tf.shape(prompts)[0]
        start = tf.RaggedTensor.from_tensor(tf.fill(tf.stack([batch, 1]), start_id))
        ids = tf.concat([start, ids], axis=1)
        tokens = ids.to_tensor(pad_id, shape=tf.stack([batch, width]))
        prompt_mask = tf.sequence_mask(ids.row_lengths(), width)
        tokens, keep = decode(tokens, prompt_mask, max_length)
        for special in special_ids:
            keep = tf.logical_and(keep, tokens != special)
        text = module.sentencepiece.detokenize(tf.ragged.boolean_mask(tokens, keep))
        return {"text": text}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="prompts")])
    def generate(prompts):
        return generate_with_length(prompts, tf.constant(default_max_length, tf.int32))

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, None], tf.int32, name="token_ids"),
            tf.TensorSpec([None, None], tf.int32, name="padding_mask"),
        ]
    )
    def logits(token_ids, padding_mask):
        hidden = backbone({"token_ids": token_ids, "padding_mask": padding_mask})
        output = backbone.token_embedding(hidden, reverse=True)
        return {"logits": ops.cast(output, "float32")}

    module.generate_fn = generate
    module.generate_with_length_fn = generate_with_length
    module.logits_fn = logits
    concrete_generate = generate.get_concrete_function()
    signatures = {
        "serving_default": concrete_generate,
        "generate": concrete_generate,
        "generate_with_length": generate_with_length.get_concrete_function(),
        "logits": logits.get_concrete_function(),
    }
    return module, signatures
