"""transformers' outputs on a GGUF file, computed once and cached for every backend's run.

transformers takes ~70 s to load the 270M GGUF (it parses the file twice), so
tests/test_real_gemma3_270m.py asks `reference(path)`, which runs this file as a script in a
subprocess the first time (torch stays out of the test process) and keeps the results in
keras_gemma's cache under the file's sha256 and transformers' version.

    python tests/gguf_reference.py FILE.gguf OUT.npz
"""

import json
import os
import subprocess
import sys

import numpy as np

# ~110 tokens, compared logit by logit.
LOGITS_TEXT = (
    "A small language model predicts the next token of a text from the tokens that came "
    "before it. To do this, it turns every token into a vector, passes the vectors through a "
    "stack of attention and feed-forward layers, and finally compares the result with the "
    "embedding of every word in its vocabulary. The scores it produces are called logits. "
    "Two programs that implement the same model with the same weights should produce the "
    "same logits, up to the small rounding errors of floating-point arithmetic, whatever "
    "library they are written in."
)
# ~190 words, scored by perplexity.
PARAGRAPH = (
    "The lighthouse keeper woke before dawn, as he had every morning for thirty years. He "
    "climbed the narrow iron stairs, counting each step out of habit rather than need, and "
    "checked the great lamp for soot and cracks. Outside, the sea was the colour of slate, "
    "and a thin rain drifted across the rocks. Far below, the village was still asleep; only "
    "the baker's window glowed yellow in the grey light. He wrote the date in his logbook, "
    "noted the direction of the wind, and recorded that two fishing boats had left the "
    "harbour during the night. When the sun finally rose, he turned off the lamp and made "
    "himself a pot of strong tea. Some people in the village thought his work was lonely, but "
    "he never felt alone. He knew every gull by its cry, every wave by its sound against the "
    "cliff, and every ship that passed on the horizon. In the afternoon he repaired a broken "
    "shutter, and in the evening he lit the lamp again, as the first stars appeared over the "
    "water."
)
PROMPT = "Once upon a time"
NEW_TOKENS = 30


# Calibration for GPTQ: text the float model writes itself from these openings (top-k
# sampling, 320 tokens each), so no dataset is needed; none of it is the scored paragraph.
CALIBRATION_PROMPTS = [
    "The committee met on Tuesday to discuss the budget for the coming year.",
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):",
    "Photosynthesis is the process by which green plants use sunlight",
    "Question: What is the capital of France?\nAnswer:",
    "She opened the letter with trembling hands.",
    "In 1969, two astronauts walked on the surface of the Moon",
]


def perplexity(logits, ids):
    """exp(mean negative log-likelihood of ids[1:] given the logits at ids[:-1]), float64."""
    logits = np.asarray(logits, np.float64)[:-1]
    top = logits.max(axis=-1, keepdims=True)
    log_z = top[:, 0] + np.log(np.exp(logits - top).sum(axis=-1))
    picked = logits[np.arange(len(logits)), np.asarray(ids)[1:]]
    return float(np.exp(np.mean(log_z - picked)))


def _compute(path, out):
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from tokenizer_corpus import CORPUS

    torch.set_num_threads(1)  # as in conftest: two threads stall when another job runs
    directory, name = os.path.split(os.path.abspath(path))
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    model.eval()

    def ids_of(text):
        return tokenizer(text, return_tensors="pt").input_ids  # with <bos>

    with torch.no_grad():
        text_ids = ids_of(LOGITS_TEXT)
        logits = model(text_ids).logits[0].float().numpy()
        paragraph_ids = ids_of(PARAGRAPH)
        paragraph_logits = model(paragraph_ids).logits[0].double().numpy()
        prompt_ids = ids_of(PROMPT)
        greedy = model.generate(prompt_ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                do_sample=False)
    corpus = {
        "default": [tokenizer(t, add_special_tokens=False).input_ids for t in CORPUS],
        "split_special_tokens": [
            tokenizer(t, add_special_tokens=False, split_special_tokens=True).input_ids
            for t in CORPUS
        ],
        "decoded": [tokenizer.decode(tokenizer(t, add_special_tokens=False).input_ids)
                    for t in CORPUS],
    }
    # One name per process: the backends' suites may compute the reference at once.
    temporary = f"{out}.partial-{os.getpid()}.npz"
    np.savez(
        temporary,
        text_ids=text_ids[0].numpy(),
        logits=logits,
        paragraph_ids=paragraph_ids[0].numpy(),
        paragraph_perplexity=perplexity(paragraph_logits, paragraph_ids[0].numpy()),
        prompt_ids=prompt_ids[0].numpy(),
        greedy_ids=greedy[0].numpy(),
        corpus=json.dumps(corpus),
        corpus_texts=json.dumps(list(CORPUS)),
        transformers_version=transformers.__version__,
    )
    os.replace(temporary, out)


def reference(path):
    """The cached reference outputs (a dict of numpy values; "corpus" parsed from JSON)."""
    import hashlib
    from importlib.metadata import version

    from keras_gemma.checkpoints import gguf
    from tokenizer_corpus import CORPUS

    # Keyed by everything the results depend on, so an edit of a text cannot go unseen.
    inputs = json.dumps([LOGITS_TEXT, PARAGRAPH, PROMPT, NEW_TOKENS, list(CORPUS)])
    inputs_hash = hashlib.sha256(inputs.encode()).hexdigest()[:12]
    out = os.path.join(
        gguf.cache_root(), "gguf", "reference",
        f"{gguf.file_sha256(path)}-transformers-{version('transformers')}-{inputs_hash}.npz",
    )
    if not os.path.exists(out):
        os.makedirs(os.path.dirname(out), exist_ok=True)
        subprocess.run([sys.executable, os.path.abspath(__file__), path, out], check=True)
    with np.load(out) as data:
        values = {key: data[key] for key in data.files}
    values["corpus"] = json.loads(str(values["corpus"]))
    values["corpus_texts"] = json.loads(str(values["corpus_texts"]))
    return values


if __name__ == "__main__":
    _compute(sys.argv[1], sys.argv[2])
