"""Several examples per row, without any example seeing another.

Padding every row to the longest example wastes compute on pad tokens: on chat data whose answers run from a few
tokens to several hundred, often half the batch. Packing concatenates the examples of a micro-batch into rows of
up to `capacity` tokens. Position ids restart at 0 for each example; with no 2D attention mask, transformers'
masking_utils (`find_packed_sequence_indices`) reads the restarts and builds a block-diagonal causal mask for the
sdpa, eager and flex paths, so attention never crosses from one example into the next.
"""

from __future__ import annotations

import torch

from tailor.train.examples import IGNORE, Example


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: indices of `lengths` grouped into rows of at most `capacity` tokens (an example longer
    than `capacity` gets a row of its own). Deterministic: ties keep the original order."""
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for row, free in enumerate(room):
            if lengths[index] <= free:
                rows[row].append(index)
                room[row] -= lengths[index]
                break
        else:
            rows.append([index])
            room.append(capacity - lengths[index])
    return rows


def pack(examples: list[Example], capacity: int, pad_id: int, device: torch.device) -> dict[str, torch.Tensor | None]:
    """input_ids, labels, position_ids [rows, width] and attention_mask None (the positions carry the boundaries).

    Rows are padded to the longest row; the padding forms a sequence of its own (positions from 0 again) and has
    no labels, so it changes nothing for the real tokens.
    """
    rows = pack_rows([len(e.input_ids) for e in examples], capacity)
    width = max(sum(len(examples[i].input_ids) for i in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            n = len(examples[i].input_ids)
            input_ids[r, start:start + n] = torch.tensor(examples[i].input_ids)
            labels[r, start:start + n] = torch.tensor(examples[i].labels)
            # the first token of an example is never predicted from the end of the one before it
            labels[r, start] = IGNORE
            position_ids[r, start:start + n] = torch.arange(n)
            start += n
        position_ids[r, start:] = torch.arange(width - start)
    return {"input_ids": input_ids.to(device), "labels": labels.to(device), "position_ids": position_ids.to(device),
            "attention_mask": None}
