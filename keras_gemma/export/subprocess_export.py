"""`python -m keras_gemma.export.subprocess_export PRESET OUT MAX_LENGTH SAMPLER_JSON`.

Run by `export_saved_model` under KERAS_BACKEND=tensorflow when the model lives on another
backend: rebuilds the model from the preset it saved and exports it here.
"""

import json
import os
import sys


def main(argv):
    preset, out, max_length, sampler_path = argv
    if os.environ.get("KERAS_BACKEND") != "tensorflow":
        raise SystemExit("run with KERAS_BACKEND=tensorflow")
    import keras

    from keras_gemma.causal_lm import GemmaCausalLM
    from keras_gemma.export.saved_model import export_saved_model

    with open(sampler_path) as file:
        sampler = keras.saving.deserialize_keras_object(json.load(file))
    causal_lm = GemmaCausalLM.from_preset(preset)
    export_saved_model(causal_lm, out, max_length=int(max_length), sampler=sampler)


if __name__ == "__main__":
    main(sys.argv[1:])
