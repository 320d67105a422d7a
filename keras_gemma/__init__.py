"""keras_gemma: Google's Gemma language models as Keras 3 layers and models."""

from keras_gemma.backbone import GemmaBackbone

__version__ = "0.1.0"
