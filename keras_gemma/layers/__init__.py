"""The pieces of a Gemma decoder block."""

from keras_gemma.layers.attention import GemmaAttention, compute_attention_mask
from keras_gemma.layers.decoder_block import GemmaDecoderBlock
from keras_gemma.layers.normalization import RMSNormalization
from keras_gemma.layers.rotary import rotary_embedding
