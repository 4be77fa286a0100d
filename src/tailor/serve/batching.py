"""The running batch of one model: its rows' KV cache, attention mask and next position ids.

Rows are left-padded: every row's newest token sits in the last column, so one decoding step feeds one token per row
and reads the last logits of every row. Padding columns are masked out (attention mask 0), and position ids count
only a row's real tokens, so a row's logits are the same as when it runs alone.

transformers 5 keeps the cache as `DynamicCache.layers[i].keys / .values`, each [batch, kv_heads, columns, head_dim];
rows join by left-padding both caches to the same width and concatenating on the batch axis, and leave by indexing.
Written by hand because no library exposes a batch that rows can join and leave between steps on a plain HF model
(vLLM does, with its own model code and GPU kernels).

The cache grows in place (`GrowingCache`): transformers' DynamicLayer appends a step's keys by concatenating, which
copies a row's whole cache twice per layer per step; at a grounded prompt's 1,100 columns that was 4.5 ms of a 25 ms
step on this CPU (30 layers). A layer here keeps its keys and values as views of buffers with room for
`GROW_COLUMNS` more columns, so a step writes only its own column.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import CacheLayerMixin, DynamicLayer

GROW_COLUMNS = 64  # spare columns a layer's buffers get when they are (re)allocated


class GrowingLayer(DynamicLayer):
    """A DynamicLayer whose `keys` and `values` are the first columns of larger buffers. Whoever replaces them
    (DecodeBatch's keep, rewind; a new cache) may set any tensor: an update appends in place only while they are still
    a leading view of the buffers, and otherwise reallocates."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.buffers: dict[str, torch.Tensor] = {}
        self.keys = self._appended("keys", self.keys, key_states)
        self.values = self._appended("values", self.values, value_states)
        return self.keys, self.values

    def _appended(self, name: str, current: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
        """`current` with `new` [rows, heads, columns, dim] after it, written into the buffer `name`."""
        used = current.shape[-2] if current is not None and current.numel() else 0
        width = used + new.shape[2]
        buffer = self.buffers.get(name)
        in_place = (buffer is not None and current is not None and used > 0 and current.data_ptr() == buffer.data_ptr()
                    and current.shape[:2] == buffer.shape[:2] and current.stride() == buffer.stride()
                    and width <= buffer.shape[2])
        if not in_place:
            rows, heads, _, dim = new.shape
            # zeros: decoding attention multiplies the spare columns by probability 0 (attention.py), and 0 * NaN is NaN
            buffer = new.new_zeros(rows, heads, width + GROW_COLUMNS, dim)
            if current is not None and used:
                buffer[:, :, :used] = current
            self.buffers[name] = buffer
        assert buffer is not None  # for mypy: set on both paths
        buffer[:, :, used:width] = new
        return buffer[:, :, :width]


class GrowingCache(DynamicCache):
    """A DynamicCache of `GrowingLayer`s, optionally filled with (keys, values) per layer."""

    def __init__(self, cache_data: list[tuple[torch.Tensor, torch.Tensor]] | None = None):
        super().__init__()
        self.layer_class_to_replicate = GrowingLayer
        for keys, values in cache_data or []:
            layer = GrowingLayer()
            layer.update(keys, values)
            self.layers.append(layer)


def left_pad(rows: list[torch.Tensor], pad_value: float | int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack sequences of different lengths ([length, ...] each) right-aligned: [rows, width, ...] and mask
    [rows, width]."""
    width = max(row.shape[0] for row in rows)
    first = rows[0]
    out = first.new_full((len(rows), width, *first.shape[1:]), pad_value)
    mask = torch.zeros(len(rows), width, dtype=torch.long, device=first.device)
    for i, row in enumerate(rows):
        out[i, width - row.shape[0]:] = row
        mask[i, width - row.shape[0]:] = 1
    return out, mask


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """[rows, width] position ids: 0 at each row's first real token; padding gets 0 (it is masked anyway)."""
    return (mask.cumsum(1) - 1).clamp(min=0)


class DecodeBatch:
    """The rows one model is decoding, in the same order as their cache rows."""

    def __init__(self) -> None:
        self._clear()

    def _clear(self) -> None:
        self.rows: list[Any] = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # [rows, columns], 1 where the cache holds a real token
        self.next_positions: torch.Tensor | None = None  # [rows], the position id of each row's next token

    def __len__(self) -> int:
        return len(self.rows)

    def _state(self) -> tuple[DynamicCache, torch.Tensor, torch.Tensor]:
        """The cache, mask and next positions, which exist exactly while the batch has rows."""
        if self.cache is None or self.mask is None or self.next_positions is None:
            raise RuntimeError("the decode batch has no rows, so no cache, mask or positions to step from")
        return self.cache, self.mask, self.next_positions

    def join(self, rows: list[Any], cache: DynamicCache, mask: torch.Tensor) -> None:
        """Add freshly prefilled rows (their own cache and mask, left-padded) to the running batch."""
        positions = mask.sum(1)
        if not self.rows:
            self.rows, self.cache, self.mask, self.next_positions = list(rows), cache, mask, positions
            return
        old_cache, old_mask, old_positions = self._state()
        width = max(old_mask.shape[1], mask.shape[1])
        old_layers, new_layers = _tensors(old_cache), _tensors(cache)
        merged = [(torch.cat([_pad_columns(k0, width), _pad_columns(k1, width)]),
                   torch.cat([_pad_columns(v0, width), _pad_columns(v1, width)]))
                  for (k0, v0), (k1, v1) in zip(old_layers, new_layers, strict=True)]
        self.cache = GrowingCache(merged)
        self.mask = torch.cat([_pad_columns(old_mask, width, dim=1), _pad_columns(mask, width, dim=1)])
        self.next_positions = torch.cat([old_positions, positions])
        self.rows.extend(rows)

    def keep(self, indices: list[int]) -> None:
        """Keep only these rows (finished and cancelled ones leave), then drop columns that are padding in every
        remaining row, so a long reply that left does not keep the others' steps wide."""
        if len(indices) == len(self.rows):
            return
        if not indices:
            self._clear()
            return
        cache, mask, next_positions = self._state()
        index = torch.tensor(indices, device=mask.device)
        mask = mask.index_select(0, index)
        first = int(mask.any(0).nonzero()[0])  # the first column some row still uses
        self.mask = mask[:, first:]
        for layer, keys, values in _layers(cache):
            layer.keys = keys.index_select(0, index)[:, :, first:]
            layer.values = values.index_select(0, index)[:, :, first:]
        self.next_positions = next_positions.index_select(0, index)
        self.rows = [self.rows[i] for i in indices]

    def step_inputs(self, tokens: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention mask [rows, columns + tokens] and position ids [rows, tokens] for feeding `tokens` more tokens
        per row."""
        _, mask, next_positions = self._state()
        ones = torch.ones(len(self.rows), tokens, dtype=mask.dtype, device=mask.device)
        self.mask = torch.cat([mask, ones], dim=1)
        positions = next_positions[:, None] + torch.arange(tokens, device=mask.device)
        self.next_positions = next_positions + tokens
        return self.mask, positions

    def rewind(self, tokens: int) -> None:
        """Forget the newest `tokens` columns (draft tokens of a speculative step that did not hold)."""
        if tokens == 0 or not self.rows:
            return
        cache, mask, next_positions = self._state()
        self.mask = mask[:, :-tokens]
        self.next_positions = next_positions - tokens
        for layer, keys, values in _layers(cache):
            layer.keys, layer.values = keys[:, :, :-tokens], values[:, :, :-tokens]


def select_rows(cache: DynamicCache, mask: torch.Tensor, indices: list[int]) -> tuple[DynamicCache, torch.Tensor]:
    """Only these rows of a freshly prefilled cache and its mask [rows, columns] (the rows that go on decoding)."""
    index = torch.tensor(indices, device=mask.device)
    for layer, keys, values in _layers(cache):
        layer.keys, layer.values = keys.index_select(0, index), values.index_select(0, index)
    return cache, mask.index_select(0, index)


def _layers(cache: DynamicCache) -> list[tuple[CacheLayerMixin, torch.Tensor, torch.Tensor]]:
    """Each layer of a filled cache with its keys and values [rows, kv_heads, columns, head_dim]. Linear-attention
    and cache-less layers have no columns to pad, join or drop, so a model with them cannot decode in a batch here."""
    layers = []
    for number, layer in enumerate(cache.layers):
        if not isinstance(layer, CacheLayerMixin) or layer.keys is None or layer.values is None:
            raise TypeError(f"cache layer {number} is a {type(layer).__name__} without keys and values; batched "
                            "decoding needs every layer to keep attention keys and values")
        layers.append((layer, layer.keys, layer.values))
    return layers


def _tensors(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(keys, values) for _, keys, values in _layers(cache)]


def _pad_columns(tensor: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    """Left-pad `tensor` with zeros along `dim` to `width` columns (cache: dim 2; mask: dim 1)."""
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)
