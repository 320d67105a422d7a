"""GemmaCausalLM: logits for training, a KV-cached decoder for generation."""

import math
import warnings

import keras
from keras import ops

from keras_gemma.checkpoints.preset_cards import PresetMapping
from keras_gemma.generation import get_sampler
from keras_gemma.generation import serialize_sampler
from keras_gemma.generation.generation_methods import GenerationMethods
from keras_gemma.generation.generator import Generator
from keras_gemma.generation.training_data import preprocess_for_training
from keras_gemma.layers.attention import CachePositions
from keras_gemma.layers.decode_matmul import xla_runs_on_cpu
from keras_gemma.logits_accuracy import LogitsAccuracy
from keras_gemma.logits_crossentropy import LogitsCrossentropy
from keras_gemma.optimizer_slot_layout import lay_out_slots_like_variables


@keras.saving.register_keras_serializable(package="keras_gemma")
class GemmaCausalLM(GenerationMethods, keras.Model):
    """A Gemma language model: next-token logits, fine-tuning and generation.

    Calling the model on `{"token_ids", "padding_mask"}` gives logits
    `[batch, sequence, vocabulary]`. `generate()` and `stream()` prefill the prompt in one
    call and then decode one token at a time from a preallocated KV cache, in one compiled
    function per backend (see `keras_gemma.generation.Generator`). With a `preprocessor`,
    `fit()`, `evaluate()`, `predict()` and `generate()` take strings. The model is compiled
    with fine-tuning defaults on construction; `compile()` again to change them.

    Threads: `generate()` and `stream()` may run in several threads at once on one model (a
    web server's workers), each caller getting the result it would have had alone: each call
    owns its inputs and KV cache, and the calls share only the compiled programs, which are
    built once (tests/test_generation_threads.py runs 4 threads x 5 mixed requests on every
    backend). Do not change the weights (`fit`, `quantize`, `enable_lora`, `merge_lora`)
    while another thread generates. A `keras.distribution` is per thread in Keras: set it in
    each thread that generates.

    Args:
        backbone: a `keras_gemma.GemmaBackbone`.
        preprocessor: a `keras_gemma.GemmaCausalLMPreprocessor`, or None to work on token ids.
        compile: compile with the fine-tuning defaults now (False leaves the model
            uncompiled; `generate()` still works, with the greedy sampler).

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

    def __init__(self, backbone, preprocessor=None, compile=True, **kwargs):
        # keras.Model would accept (and ignore) any keyword; a typo should not pass silently.
        unknown = sorted(set(kwargs) - {"name", "trainable", "dtype"})
        if unknown:
            raise TypeError(f"GemmaCausalLM got unexpected keyword arguments {unknown}.")
        inputs = backbone.input
        hidden = backbone(inputs)
        outputs = backbone.token_embedding(hidden, reverse=True)
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)
        # Attached after Model.__init__: the torch backend refuses module attributes before.
        self.backbone = backbone
        self.preprocessor = preprocessor
        self.generator = Generator(self)
        # generate() needs a sampler even before (or without) compile(), as in KerasHub.
        self.sampler = get_sampler("greedy")
        if compile:
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
        The loss and accuracy are `keras_gemma.LogitsCrossentropy` and
        `keras_gemma.LogitsAccuracy`: Keras' sparse categorical cross-entropy (from logits)
        and accuracy, value for value, computed faster under XLA; an instance of Keras'
        own classes given here is swapped for them (with its name, reduction and dtype).
        On TensorFlow on a CPU, `jit_compile="auto"` (Keras' default) means XLA for a
        float32 model (Keras leaves it off on CPUs; here it trains ~1.2x faster), and no XLA
        again once the model is quantized.

        Args:
            sampler: a name ("greedy", "top_k", "top_p", "random", "beam",
                "contrastive") or a `keras_gemma.samplers` sampler object.
        """
        if optimizer == "auto":
            optimizer = keras.optimizers.AdamW(learning_rate=2e-5, weight_decay=0.01)
            optimizer.exclude_from_weight_decay(var_names=["scale", "embeddings"])
        if loss == "auto":
            loss = LogitsCrossentropy()
        if weighted_metrics == "auto":
            weighted_metrics = [LogitsAccuracy()]
        # Keras' own sparse cross-entropy and accuracy, computed faster under XLA (same
        # values; logits_crossentropy.py, logits_accuracy.py).
        loss = LogitsCrossentropy.replacing(loss)
        weighted_metrics = _with_logits_accuracy(weighted_metrics)
        if "metrics" in kwargs:
            kwargs["metrics"] = _with_logits_accuracy(kwargs["metrics"])
        # Whether Keras' "auto" picks XLA (see _resolve_auto_jit_compile; quantize re-decides).
        self._jit_compile_auto = kwargs.get("jit_compile", "auto") == "auto"
        super().compile(
            optimizer=optimizer, loss=loss, weighted_metrics=weighted_metrics, **kwargs
        )
        self.sampler = get_sampler(sampler)

    def _resolve_auto_jit_compile(self):
        # Keras' hook for `jit_compile="auto"` (compile's default).
        if self._xla_trains_faster_here():
            return True
        return super()._resolve_auto_jit_compile()

    def _xla_trains_faster_here(self):
        """TensorFlow on a CPU: Keras' "auto" leaves XLA off there, but a float32 Gemma
        trains faster with it, and steadily (small full fit of benchmarks/finetune.py:
        217-219 ms a step against 250-270 without XLA, and 430 in about one process in
        three: without XLA the same program ran at two speeds, a process's whole life, the
        slow one never under TensorFlow's profiler; KerasHub's model under XLA took 426 ms).
        The first step compiles longer (4.3 s against 3.8). 16-bit and quantized weights
        stay without XLA: its CPU dot converts them to float32 copies
        (sixteen_bit_product.py)."""
        if keras.backend.backend() != "tensorflow" or not xla_runs_on_cpu():
            return False
        if keras.backend.standardize_dtype(self.backbone.compute_dtype) != "float32":
            return False
        return all(
            keras.backend.standardize_dtype(weight.dtype) == "float32"
            for weight in self.backbone.weights
        )

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

    def train_step(self, *args, **kwargs):
        # torch: optimizer slots in the memory order of their variables (optimizer_slot_layout.py).
        lay_out_slots_like_variables(self.optimizer, self.trainable_variables)
        return super().train_step(*args, **kwargs)

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

    # The backbone and preprocessor classes `from_preset` builds (Gemma3CausalLM's differ).
    backbone_cls = None
    preprocessor_cls = None

    @classmethod
    def from_preset(
        cls, preset, dtype=None, sequence_length=None, load_weights=True, quantize=None,
        check_memory=True, **kwargs
    ):
        """A GemmaCausalLM with its backbone, tokenizer and preprocessor from one handle.

        `preset` is a name from `keras_gemma.list_presets()`, a local directory (keras_gemma,
        KerasHub or transformers format), a .gguf file, `kaggle://...` or `hf://...`.
        `dtype` goes to the backbone and `sequence_length` to the preprocessor; other keyword
        arguments go to the constructor, as in KerasHub: `backbone=` or `preprocessor=`
        (None for a model on token ids) replace what the preset would load, and
        `compile=False` leaves the model uncompiled. `quantize="int8"` or `"int4"` quantizes
        while loading (one layer in float at a time; the same model as loading in float and
        calling `quantize`); a saved quantized preset loads quantized without it. A load that
        cannot fit in the memory left to the process raises `MemoryError` before anything is
        allocated (`check_memory=False` or KERAS_GEMMA_SKIP_MEMORY_CHECK=1 skips the check).

        Example:
        >>> lm = GemmaCausalLM.from_preset("gemma3_270m", dtype="float32")
        >>> lm.generate("The capital of France is", max_length=16)
        >>> preprocessor = GemmaCausalLMPreprocessor.from_preset("gemma3_270m", sequence_length=256)
        >>> lm = GemmaCausalLM.from_preset("gemma3_270m", preprocessor=preprocessor)
        >>> lm = GemmaCausalLM.from_preset("gemma3_270m", quantize="int8")
        """
        from keras_gemma.checkpoints.loader import resolve

        resolved = resolve(preset)
        if "backbone" not in kwargs:
            backbone_cls = cls.backbone_cls or _default_class("backbone")
            kwargs["backbone"] = backbone_cls.from_preset(
                resolved, dtype=dtype, load_weights=load_weights, quantize=quantize,
                check_memory=check_memory,
            )
        elif dtype is not None or quantize is not None:
            raise ValueError(
                "from_preset: pass dtype= and quantize= to the backbone you give, not here."
            )
        if "preprocessor" not in kwargs:
            preprocessor_cls = cls.preprocessor_cls or _default_class("preprocessor")
            try:
                kwargs["preprocessor"] = preprocessor_cls.from_preset(
                    resolved, sequence_length=sequence_length
                )
            except FileNotFoundError as error:
                warnings.warn(f"{error} The model works on token ids only (preprocessor=None).")
                kwargs["preprocessor"] = None
        elif sequence_length is not None:
            raise ValueError(
                "from_preset: sequence_length= sets the preset's preprocessor; give it to the "
                "preprocessor you pass instead."
            )
        return cls(**kwargs)

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

    def export_to_transformers(self, path, dtype=None):
        """Writes a transformers directory (config, safetensors, tokenizer) that
        `transformers.AutoModelForCausalLM.from_pretrained(path)` loads with no code of ours.

        KerasHub's name. `dtype` ("float32", "bfloat16", "float16") picks the saved weights'
        dtype (default: the model's). See `keras_gemma.export.transformers_export`.

        Example:
        >>> lm.export_to_transformers("./gemma_hf")
        """
        from keras_gemma.export.transformers_export import export_to_transformers

        return export_to_transformers(self, path, dtype=dtype)

    def export_to_gguf(self, path, dtype="f16"):
        """Writes a GGUF file (tokenizer included) for llama.cpp: dtype "f16", "bf16" or "q8_0".

        Example:
        >>> lm.export_to_gguf("gemma-q8_0.gguf", dtype="q8_0")
        """
        from keras_gemma.export.gguf_export import export_to_gguf

        return export_to_gguf(self, path, dtype=dtype)

    def quantize(self, mode=None, *args, check_memory=True, **kwargs):
        """`backbone.quantize` (Keras' `Model.quantize`, e.g. "int8"); compiled generate
        functions are rebuilt. Only the backbone has layers to quantize. A quantization whose
        weights cannot fit beside the float ones raises `MemoryError` first
        (`check_memory=False` skips the check)."""
        self.backbone.quantize(mode, *args, check_memory=check_memory, **kwargs)
        self.generator.reset()
        if (
            self.compiled
            and getattr(self, "_jit_compile_auto", False)
            and keras.backend.backend() == "tensorflow"
            and xla_runs_on_cpu()
            and self.jit_compile
            and not self._xla_trains_faster_here()
        ):
            # XLA was "auto"'s choice for float32 weights (_resolve_auto_jit_compile); its
            # CPU dot would hold float32 copies of quantized ones.
            self.jit_compile = False
            self.train_function = self.test_function = self.predict_function = None

    def merge_lora(self):
        """`backbone.merge_lora()`: folds LoRA into the kernels; generate functions are rebuilt.

        Example:
        >>> lm.backbone.enable_lora(rank=4); lm.fit(data)
        >>> lm.merge_lora(); lm.save_to_preset("./merged")
        """
        self.backbone.merge_lora()
        self.generator.reset()

    def score(
        self,
        token_ids,
        padding_mask=None,
        scoring_mode="logits",
        layer_intercept_fn=None,
        target_ids=None,
    ):
        """Per-token logits [batch, tokens, vocabulary] or losses [batch, tokens] of `token_ids`.

        KerasHub's `score`: `scoring_mode="loss"` needs `target_ids` (each position's token
        to score); `layer_intercept_fn(x, index)` may read or replace the activations (index
        -1: the embeddings, then each decoder block); see `keras_gemma.scoring.score_tokens`.

        Example:
        >>> batch = lm.preprocessor.generate_preprocess(["The sky is blue"])
        >>> ids = batch["token_ids"]
        >>> losses = lm.score(ids, batch["padding_mask"], scoring_mode="loss",
        ...                   target_ids=keras.ops.roll(ids, shift=-1, axis=1))
        """
        from keras_gemma.scoring import score_tokens

        return score_tokens(
            self.backbone, token_ids, padding_mask, scoring_mode, layer_intercept_fn, target_ids
        )

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
        # Masks and rotary tables made once for all blocks (a traced torch step replays each op).
        positions = CachePositions(
            ops.shape(token_ids)[1], ops.shape(caches[0])[2], cache_update_index, padding_mask
        )
        updated = []
        for block, cache in zip(backbone.transformer_layers, caches):
            x, cache = block(
                x,
                padding_mask=padding_mask,
                cache=cache,
                cache_update_index=cache_update_index,
                cache_positions=positions,
            )
            updated.append(cache)
        return backbone.final_normalization(x), updated


def _default_class(kind):
    # Imported late: the backbone and preprocessor modules import the preset loader.
    if kind == "backbone":
        from keras_gemma.backbone import GemmaBackbone

        return GemmaBackbone
    from keras_gemma.preprocessor import GemmaCausalLMPreprocessor

    return GemmaCausalLMPreprocessor


def _with_logits_accuracy(metrics):
    if isinstance(metrics, (list, tuple)):
        return type(metrics)(LogitsAccuracy.replacing(metric) for metric in metrics)
    return LogitsAccuracy.replacing(metrics)
