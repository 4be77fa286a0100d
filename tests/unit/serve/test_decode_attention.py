"""The CPU decoding attention and the cache that grows in place: the same outputs as transformers' SDPA path and as
a concatenating DynamicLayer, for grouped-query heads, padding masks, speculative draft positions, rewinds and rows
that leave."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from tailor.serve import attention
from tailor.serve.attention import cpu_decode_attention
from tailor.serve.batching import GROW_COLUMNS, GrowingCache, GrowingLayer


class GroupedHeads(nn.Module):
    num_key_value_groups = 3  # 6 query heads over 2 key/value heads, as SmolLM2 (9 over 3)
    is_causal = True


def reference(query, key, value, mask):
    return sdpa_attention_forward(GroupedHeads(), query.float(), key.float(), value.float(),
                                  None if mask is None else mask, scaling=0.125)[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("positions", [1, 4])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("path", ["packed_sdpa", "matmuls"])
def test_decoding_attention_equals_sdpa_on_a_growing_cache(dtype, positions, padded, path, monkeypatch):
    if path == "matmuls":  # the path of a large cache
        monkeypatch.setattr(attention, "PACKED_SDPA_POSITIONS", 0)
    torch.manual_seed(0)
    rows, columns, dim = 3, 37, 64
    layer = GrowingLayer()
    keys, values = layer.update(torch.randn(rows, 2, columns - positions, dim, dtype=dtype),
                                torch.randn(rows, 2, columns - positions, dim, dtype=dtype))
    keys, values = layer.update(torch.randn(rows, 2, positions, dim, dtype=dtype),
                                torch.randn(rows, 2, positions, dim, dtype=dtype))
    assert keys.shape[2] == columns and not keys.is_contiguous()  # a leading view of a buffer with room
    query = torch.randn(rows, 6, positions, dim, dtype=dtype)
    mask = None
    if padded or positions > 1:  # SDPA's mask: True where a position may attend
        mask = torch.ones(positions, columns, dtype=torch.bool).tril(columns - positions)[None, None].repeat(
            rows, 1, 1, 1)
        if padded:
            mask[1, :, :, :5] = False  # row 1 is left-padded by 5 columns
    with torch.inference_mode():
        out, _ = cpu_decode_attention(GroupedHeads(), query, keys, values, mask, scaling=0.125)
        unmasked, _ = cpu_decode_attention(GroupedHeads(), query, keys, values, None, scaling=0.125)
    assert out.shape == (rows, positions, 6, dim) and out.dtype == dtype
    expected = reference(query, keys, values, mask)
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out.float(), expected, atol=tolerance, rtol=tolerance)
    if padded:  # the mask mattered: without it row 1 reads its padding
        assert not torch.allclose(unmasked[1].float(), out[1].float(), atol=tolerance)
    else:  # no mask given: the draft positions are still causal
        torch.testing.assert_close(unmasked.float(), expected, atol=tolerance, rtol=tolerance)


def test_prompts_take_sdpa():
    torch.manual_seed(1)
    query, keys, values = torch.randn(2, 6, 20, 16), torch.randn(2, 2, 20, 16), torch.randn(2, 2, 20, 16)
    with torch.inference_mode():
        out, _ = cpu_decode_attention(GroupedHeads(), query, keys, values, None, scaling=0.25)
    torch.testing.assert_close(out, sdpa_attention_forward(GroupedHeads(), query, keys, values, None,
                                                           scaling=0.25)[0])


def test_the_cache_grows_in_place_and_matches_concatenation():
    torch.manual_seed(2)
    growing, concatenating = GrowingLayer(), DynamicLayer()

    def both(columns: int, rows: int = 2) -> torch.Tensor:
        keys, values = torch.randn(rows, 3, columns, 8), torch.randn(rows, 3, columns, 8)
        got = growing.update(keys, values)
        want = concatenating.update(keys, values)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        return got

    both(10)
    first = growing.keys.data_ptr()
    for _ in range(GROW_COLUMNS):  # decoding steps up to the buffer's room: no new buffer
        both(1)
    assert growing.keys.data_ptr() == first and growing.keys.shape[2] == 10 + GROW_COLUMNS
    both(1)  # one more: a bigger buffer, the same contents
    assert growing.keys.data_ptr() != first
    # a speculative step's rejected drafts are rewound by slicing; the next step overwrites their columns
    grown = growing.keys.data_ptr()
    both(4)
    growing.keys, growing.values = growing.keys[:, :, :-3], growing.values[:, :, :-3]
    concatenating.keys, concatenating.values = concatenating.keys[:, :, :-3], concatenating.values[:, :, :-3]
    both(1)
    assert growing.keys.data_ptr() == grown
    # a row leaves (DecodeBatch.keep selects rows): the next step appends to a fresh buffer
    for layer in (growing, concatenating):
        layer.keys, layer.values = layer.keys[[1]], layer.values[[1]]
    both(1, rows=1)


def test_a_cache_filled_from_tensors_grows_like_a_fresh_one():
    torch.manual_seed(3)
    data = [(torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)) for _ in range(3)]
    cache = GrowingCache(data)
    assert len(cache.layers) == 3 and cache.get_seq_length() == 5
    assert all(isinstance(layer, GrowingLayer) for layer in cache.layers)
    step = torch.randn(1, 2, 1, 4)
    keys, _ = cache.update(step, step, 2)
    torch.testing.assert_close(keys, torch.cat([data[2][0], step], 2), rtol=0, atol=0)
    fresh = GrowingCache()
    fresh.update(step, step, 0)
    assert isinstance(fresh.layers[0], GrowingLayer)
