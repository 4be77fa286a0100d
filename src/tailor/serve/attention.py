"""Attention for the decoding steps of a CPU engine.

A decoding step asks attention for one query position per row (a few with speculation) against the whole cache.
PyTorch's CPU SDPA kernel (flash attention for CPU) is built for long queries: in bf16 it took 123 us per layer at
300 cached positions and 495 us at 1,100 (a grounded prompt), 2 threads, where two plain matrix products over the
grouped heads take 45 and 59 us. At 30 layers that is 13 ms of a RAG-shaped decoding step spent waiting on the
kernel (serve.json). So the serving models use `CPU_DECODE` as their attention implementation: steps of a few
positions on a CPU run the two products below (grouped-query heads share their key and value rows without copying
them, softmax in fp32); everything else (prompts, GPUs) is transformers' SDPA path unchanged.

Registered with transformers' AttentionInterface, the documented way to plug an attention function into its models.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

CPU_DECODE = "tailor_cpu_decode"
DECODE_POSITIONS = 8  # query positions per row up to which a forward pass is a decoding step (speculation included)


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
    # a GrowingCache layer's keys are the first columns of a buffer (batching.py): the matrix products run on the
    # contiguous buffer, columns past the cache's masked out, because on a strided view they copy it first
    key, value = _buffer_of(key), _buffer_of(value)
    groups = heads // kv_heads  # head h reads key/value head h // groups (transformers' repeat_kv order)
    scale = dim ** -0.5 if scaling is None else scaling
    grouped = query.reshape(rows, kv_heads, groups * positions, dim)
    scores = (grouped @ key.transpose(-1, -2)).float().mul_(scale)
    scores = scores.view(rows, kv_heads, groups, positions, key.shape[2])
    scores[..., columns:] = float("-inf")
    if attention_mask is None and positions > 1:  # the newest positions see the cache and the draft before them
        attention_mask = torch.ones(positions, columns, dtype=torch.bool, device=query.device).tril(
            columns - positions)[None, None]
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
