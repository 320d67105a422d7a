"""keras_gemma: Google's Gemma language models as Keras 3 layers and models."""

from keras_gemma.backbone import GemmaBackbone
from keras_gemma.causal_lm import GemmaCausalLM
from keras_gemma.chat_session import ChatSession
from keras_gemma.checkpoints.preset_cards import list_presets
from keras_gemma.checkpoints.upload import upload_preset
from keras_gemma.export import export_saved_model
from keras_gemma.gemma3_backbone import Gemma3Backbone
from keras_gemma.gemma3_causal_lm import Gemma3CausalLM
from keras_gemma.gemma3_causal_lm_preprocessor import Gemma3CausalLMPreprocessor
from keras_gemma.gemma3_tokenizer import Gemma3Tokenizer
from keras_gemma.logits_accuracy import LogitsAccuracy
from keras_gemma.logits_crossentropy import LogitsCrossentropy
from keras_gemma.preprocessor import GemmaCausalLMPreprocessor
from keras_gemma.tokenizer import GemmaTokenizer

# KerasHub's namespaces, so that `import keras_gemma as keras_hub` runs KerasHub code.
from keras_gemma import models  # noqa: E402
from keras_gemma import samplers  # noqa: E402

__version__ = "0.1.0"
