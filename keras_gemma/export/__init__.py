"""TF SavedModel export with `generate` and `logits` signatures."""

from keras_gemma.export.saved_model import export_saved_model
