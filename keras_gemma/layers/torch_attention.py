"""Attention of many query positions through PyTorch's fused `scaled_dot_product_attention`.

GemmaAttention's own attention (two einsums, a float32 softmax) holds the logits and the
probabilities of every head as tensors of [query, key] each; torch's fused kernel (on a
CPU, a flash-attention loop over blocks of keys) holds neither. Used on torch for every call
of more than one query position (prefill, scoring, training) where the layer has no logit
soft-cap (Gemma 2's tanh is not in the fused kernel) and no attention dropout is active; a
decode step (one position) keeps the einsums, which the traced step's op count was cut for.

Measured on the 2-core AMD EPYC of 2026-12-06 (torch 2.13, 2 threads), the real Gemma 3
270M's prefill (`hidden_with_cache` of a random prompt, A/B interleaved in one process, best
of four, seconds; peak RSS in separate processes):

    prompt tokens     float32: einsums   fused        bfloat16: einsums   fused
    128               0.149              0.142        0.118               0.118
    1024              1.154              1.088        0.69-0.88           0.86-0.89
    2048              4.58               2.87
    4096              15.1, +0.32 GB     9.8, +0.0    9.9-10.2, +0.8 GB   8.5-9.5, +0.1-0.2

(then each block converted the mask; converted once a call, float32 at 4,096 tokens takes
9.0 s, and at 1,024 0.98 s against the einsums' 1.04 in another A/B run.)

The einsums' logits and probabilities grow with the square of the prompt (4 heads x 4096 x
4096 x 4 bytes = 256 MB a tensor at 4096), the fused kernel's do not. bfloat16 outputs stay
as close to float32 as the einsums' (512 tokens: relative error of the final hidden states
2.9% against 2.8%, greedy next tokens agreeing with float32 at 95.5% against 94.7% of the
positions); float32 agrees with the einsums to 3e-6.

Masks: the layer's boolean mask becomes an additive float mask of 0 and `masked_logit`, so a
query whose keys are all masked gets the same uniform distribution as the einsum path (a
boolean mask would give it NaN or zeros, depending on the kernel). A cached call makes it once
for all blocks (`CachePositions.derived`): converting a 4,096-token prompt's mask took 46 ms
a block, 0.8 s of the 9.8 s prefill when each block did it (now 9.0 s).

Example:
>>> if torch_attention.applies(query, attention_mask, soft_cap=None, dropout_active=False):
...     mask = torch_attention.additive_mask(attention_mask, query.dtype, -1e30)
...     output = torch_attention.attend(query, key, value, mask, scale)
"""

import functools

import keras


def applies(query, attention_mask, soft_cap, dropout_active):
    """Whether `attend` runs this call: torch 2.5 or later, more than one query position, no
    soft-cap, no dropout, a mask given."""
    if keras.backend.backend() != "torch" or soft_cap is not None or dropout_active:
        return False
    if attention_mask is None or len(query.shape) != 5 or not _takes_key_value_groups():
        return False
    return query.shape[1] is not None and query.shape[1] > 1


@functools.lru_cache(maxsize=None)
def _takes_key_value_groups():
    """`scaled_dot_product_attention(..., enable_gqa=True)` came with torch 2.5."""
    import torch

    major, minor = (int(part) for part in torch.__version__.split(".")[:2])
    return (major, minor) >= (2, 5)


def additive_mask(attention_mask, dtype, masked_logit):
    """The boolean mask [batch or 1, query, keys] or [batch or 1, 1, 1, query, keys] as the
    fused kernel's additive mask [batch or 1, 1, query, keys] of `dtype`: 0 where visible,
    `masked_logit` elsewhere."""
    import torch

    mask = attention_mask[:, :, 0] if attention_mask.ndim == 5 else attention_mask[:, None]
    return torch.where(mask, 0.0, masked_logit).to(dtype)


def attend(query, key, value, mask, scale):
    """`softmax(scale * q k^T + mask) v` for `query` [batch, query, kv_heads, groups,
    head_dim], `key`/`value` [batch, keys, kv_heads, head_dim] and an `additive_mask`; the
    output is [batch, query, kv_heads, groups, head_dim] in the query's dtype."""
    import torch

    batch, length, kv_heads, groups, head_dim = query.shape
    # Query head k * groups + g reads key/value head k: the fused kernel's grouping.
    output = torch.nn.functional.scaled_dot_product_attention(
        query.reshape(batch, length, kv_heads * groups, head_dim).transpose(1, 2),
        key.transpose(1, 2),
        value.transpose(1, 2),
        attn_mask=mask,
        scale=scale,
        enable_gqa=True,
    )
    return output.transpose(1, 2).reshape(batch, length, kv_heads, groups, head_dim)
