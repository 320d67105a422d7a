"""KerasHub's `keras_hub.models` names for the Gemma classes.

With it, code written for KerasHub runs after changing one import line:

```python
import keras_gemma as keras_hub   # was: import keras_hub
gemma_lm = keras_hub.models.GemmaCausalLM.from_preset("gemma3_270m")
gemma_lm.compile(sampler=keras_hub.samplers.TopKSampler(k=5, seed=2))
```
"""

from keras_gemma.backbone import GemmaBackbone
from keras_gemma.causal_lm import GemmaCausalLM
from keras_gemma.gemma3_backbone import Gemma3Backbone
from keras_gemma.gemma3_causal_lm import Gemma3CausalLM
from keras_gemma.gemma3_causal_lm_preprocessor import Gemma3CausalLMPreprocessor
from keras_gemma.gemma3_tokenizer import Gemma3Tokenizer
from keras_gemma.preprocessor import GemmaCausalLMPreprocessor
from keras_gemma.tokenizer import GemmaTokenizer

__all__ = [
    "Gemma3Backbone",
    "Gemma3CausalLM",
    "Gemma3CausalLMPreprocessor",
    "Gemma3Tokenizer",
    "GemmaBackbone",
    "GemmaCausalLM",
    "GemmaCausalLMPreprocessor",
    "GemmaTokenizer",
]
