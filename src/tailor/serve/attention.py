"""Attention for the decoding steps of a CPU engine.

A decoding step asks attention for one query position per row (a few with speculation) against the whole cache.
transformers hands such a step to PyTorch's CPU SDPA kernel (flash attention for CPU) with its grouped-query flag,
and in bf16 that took 123 us per layer at 300 cached positions and 486 us at 1,100 (a grounded prompt), 2 threads: at
30 layers, 13 ms of a RAG-shaped decoding step. Two ways are faster, each where the other is not (2 threads, bf16,
one layer; benchmarks/results/decode_step.json has whole steps):

| rows x cached positions | transformers' SDPA call | SDPA, query heads packed per key head | two matmuls |
|---|---|---|---|
| 1 x 150 | 70 us | 15 us | 51 us |
| 1 x 1,100 | 486 us | 72 us | 71 us |
| 8 x 150 | | 72 us | 90 us |
| 8 x 1,100 | | 437 us | 223 us |

So the serving models use `CPU_DECODE` as their attention implementation. A step of a few positions on a CPU
packs the query heads that share a key/value head into one query of several positions, so SDPA reads each cached
row once (transformers packs them too, but only without a mask and without its grouped-query flag), while the
cache is small; from `PACKED_SDPA_POSITIONS` cached positions over all rows on, it runs two plain matrix products
with softmax in fp32. Everything else (prompts, GPUs) is transformers' SDPA path unchanged.

Registered with transformers' AttentionInterface, the documented way to plug an attention function into its models.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

CPU_DECODE = "tailor_cpu_decode"
DECODE_POSITIONS = 8  # query positions per row up to which a forward pass is a decoding step (speculation included)
PACKED_SDPA_POSITIONS = 2048  # cached positions over all rows up to which packed SDPA is the faster (table above)


def cpu_decode_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                         is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """query [rows, heads, positions, dim], key and value [rows, kv_heads, columns, dim], the mask boolean (True:
    attend) or additive, [rows or 1, 1, positions, columns]; returns [rows, positions, heads, dim] as transformers'
    attention functions do."""
    rows, heads, positions, dim = query.shape
    if (query.device.type != "cpu" or positions > DECODE_POSITIONS or dropout or kwargs.get("position_bias") is not None
            or kwargs.get("softcap") is not None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    kv_heads, columns = key.shape[1], key.shape[2]
    groups = heads // kv_heads  # head h reads key/value head h // groups (transformers' repeat_kv order)
    scale = dim ** -0.5 if scaling is None else scaling
    # [rows, kv_heads, groups * positions, dim]: the heads of one key/value head as one query, (group, position) order
    grouped = query.reshape(rows, kv_heads, groups * positions, dim)
    if attention_mask is None and positions > 1:  # the newest positions see the cache and the draft before them
        attention_mask = torch.ones(positions, columns, dtype=torch.bool, device=query.device).tril(
            columns - positions)[None, None]
    if rows * columns <= PACKED_SDPA_POSITIONS:  # SDPA reads a strided cache view without copying it
        mask = None if attention_mask is None else attention_mask.repeat(1, 1, groups, 1)
        out = torch.nn.functional.scaled_dot_product_attention(grouped, key, value, attn_mask=mask, scale=scale)
        return out.view(rows, heads, positions, dim).transpose(1, 2).contiguous(), None
    # a GrowingCache layer's keys are the first columns of a buffer (batching.py): the matrix products run on the
    # contiguous buffer, columns past the cache's masked out, because on a strided view they copy it first
    key, value = _buffer_of(key), _buffer_of(value)
    scores = (grouped @ key.transpose(-1, -2)).float().mul_(scale)
    scores = scores.view(rows, kv_heads, groups, positions, key.shape[2])
    scores[..., columns:] = float("-inf")
    if attention_mask is not None:
        mask = attention_mask[:, :, None]  # [rows or 1, 1, 1, positions, columns]
        cached = scores[..., :columns]
        if mask.dtype == torch.bool:
            cached.masked_fill_(~mask, float("-inf"))
        else:
            cached.add_(mask)
    probs = scores.softmax(-1).to(value.dtype).view(rows, kv_heads, groups * positions, key.shape[2])
    out = (probs @ value).view(rows, heads, positions, dim)
    return out.transpose(1, 2).contiguous(), None


def _buffer_of(states: torch.Tensor) -> torch.Tensor:
    """The contiguous buffer whose first columns `states` [rows, heads, columns, dim] are (their strides say how many
    columns it has; views made in inference mode do not record their base), else `states`. Its columns past
    `states` hold zeros or keys of rewound draft tokens, finite numbers the caller masks out."""
    rows, heads, columns, dim = states.shape
    capacity = states.stride(1) // dim
    if (capacity <= columns or states.storage_offset() != 0 or states.stride() != (heads * capacity * dim,
                                                                                   capacity * dim, dim, 1)
            or states.untyped_storage().nbytes() < rows * heads * capacity * dim * states.element_size()):
        return states
    return states.as_strided((rows, heads, capacity, dim), (heads * capacity * dim, capacity * dim, dim, 1))


AttentionInterface.register(CPU_DECODE, cpu_decode_attention)
AttentionMaskInterface.register(CPU_DECODE, sdpa_mask)  # the same masks as SDPA, which it falls back to


def use_cpu_decode_attention(model: torch.nn.Module) -> torch.nn.Module:
    """Give a model loaded for serving the CPU decoding attention, where it runs SDPA (the default)."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "_attn_implementation", None) == "sdpa":
        model.set_attn_implementation(CPU_DECODE)  # type: ignore[operator]  # nn.Module's __getattr__ hides it
    return model
