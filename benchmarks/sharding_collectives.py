"""Communication and per-device FLOPs of the attention sharding choices, from compiled HLO.

Backs the numbers in `keras_gemma.distribution`'s docstring. One decoder layer with a
preset's shapes (vocabulary cut to 2,048 so the embedding does not dominate) is built under
ModelParallel on simulated CPU devices, mesh (1, model axis size), and its forward pass on
[2, seq_len] tokens is compiled, not run. Printed per layout: the bytes each collective
kind moves (summed over the HLO's collective ops) and XLA's per-device FLOP estimate.

  head_dim      our map: q/k/v on head_dim, attention_output on its head_dim input
  hidden_in     q/k/v on their hidden (input) axis, attention_output on its hidden output
  query_heads   q on heads, k/v on head_dim (only where the query heads divide by 8)

Usage: python benchmarks/sharding_collectives.py gemma_2b_en 512 [model_axis_size=8]
"""

import os
import re
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["KERAS_BACKEND"] = "jax"

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_gemma import GemmaBackbone  # noqa: E402

QKV = r"(?:.+/)?decoder_block_\d+/attention/(?:query|key|value)/kernel"
OUT = r"(?:.+/)?decoder_block_\d+/attention/attention_output/kernel"
ALTERNATIVES = {
    "head_dim": {},
    "hidden_in": {QKV: (None, None, "model"), OUT: ("model", None, None)},
    "query_heads": {
        QKV: None,
        r".*attention/query/kernel": ("model", None, None),
        r".*attention/(?:key|value)/kernel": (None, "model", None),
        OUT: (None, "model", None),
    },
}
BYTES = {"f32": 4, "bf16": 2, "s32": 4, "u32": 4, "pred": 1}


def collective_bytes(hlo):
    totals = {}
    pattern = (r"=\s*(\(?[^=]*?\)?)\s+(all-reduce|all-gather|reduce-scatter|"
               r"collective-permute|all-to-all)(?:-start)?\(")
    for line in hlo.splitlines():
        match = re.search(pattern, line)
        if not match:
            continue
        size = 0
        for dtype, dims in re.findall(r"(f32|bf16|s32|u32|pred)\[([\d,]*)\]", match.group(1)):
            size += BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d]))
        totals[match.group(2)] = totals.get(match.group(2), 0) + size
    return totals


def main(preset, seq_len, model=8):
    config = dict(GemmaBackbone.presets[preset]["backbone"], num_layers=1, vocabulary_size=2048)
    mesh = keras.distribution.DeviceMesh((1, model), ("batch", "model"), jax.devices()[:model])
    for name, changes in ALTERNATIVES.items():
        if name == "query_heads" and config["num_query_heads"] % model:
            print(f"{name:12s} query heads {config['num_query_heads']} do not divide by {model}")
            continue
        layouts = GemmaBackbone.get_layout_map(mesh)
        for pattern, axes in changes.items():
            if pattern in list(layouts):  # `in` would regex-match
                del layouts[pattern]
            if axes is not None:
                layouts[pattern] = axes
        distribution = keras.distribution.ModelParallel(layout_map=layouts, batch_dim_name="batch")
        with distribution.scope():
            backbone = GemmaBackbone(**config)
            data = {"token_ids": np.zeros((2, seq_len), "int32"),
                    "padding_mask": np.ones((2, seq_len), "int32")}
            weights = [v.value for v in backbone.trainable_variables]
            compiled = jax.jit(lambda w, x: backbone.stateless_call(w, [], x)[0]).lower(
                weights, data).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        moved = collective_bytes(compiled.as_text())
        print(f"{name:12s} collectives {sum(moved.values()) / 1e6:9.1f} MB {moved}  "
              f"GFLOP per device {cost.get('flops', 0) / 1e9:.1f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "gemma_2b_en",
         int(sys.argv[2]) if len(sys.argv) > 2 else 512,
         int(sys.argv[3]) if len(sys.argv) > 3 else 8)
