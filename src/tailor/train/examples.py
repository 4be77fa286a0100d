"""Chat records → token ids with a loss mask, and length-grouped padded batches."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from tailor.errors import TailorError

IGNORE = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE on every token the model must not be trained to produce

    @property
    def n_label_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE)


def chat_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def tokenize_chat(tokenizer, messages: list[dict], where: str = "record", last_turn_only: bool = False) -> Example:
    """Labels are IGNORE on everything but the assistant turns: the loss must only teach the answers.
    `last_turn_only`: only the final assistant turn, when the earlier ones are context (few-shot examples)."""
    input_ids = chat_ids(tokenizer, messages)
    labels = [IGNORE] * len(input_ids)
    for turn, message in enumerate(messages):
        if message["role"] != "assistant" or (last_turn_only and turn != len(messages) - 1):
            continue
        prefix = chat_ids(tokenizer, messages[:turn], add_generation_prompt=True)
        upto = chat_ids(tokenizer, messages[: turn + 1])
        if input_ids[: len(prefix)] != prefix or input_ids[: len(upto)] != upto:
            raise TailorError(f"{where}: the chat template does not render turns as prefixes of the whole "
                              f"conversation, so the answer tokens cannot be located")
        labels[len(prefix): len(upto)] = input_ids[len(prefix): len(upto)]
    if not any(label != IGNORE for label in labels):
        raise TailorError(f"{where}: no assistant turn to learn from")
    return Example(input_ids, labels)


def count_chat_tokens(tokenizer, messages: list[dict]) -> int:
    return len(chat_ids(tokenizer, messages))


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Batches of item indices for one epoch (`lengths`: tokens per item), the same for a given (seed, epoch) so
    resume can replay them.

    Items are grouped by length before batching (less padding), then the batches are shuffled.
    """
    rng = random.Random(f"{seed}:{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    # sort within windows of 16 batches: similar lengths together, still random across windows
    window = batch_size * 16
    grouped = []
    for start in range(0, len(order), window):
        grouped += sorted(order[start:start + window], key=lambda i: lengths[i])
    batches = [grouped[i:i + batch_size] for i in range(0, len(grouped), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(examples: list[Example], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: input_ids, attention_mask, labels, each [batch, tokens]."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device), "labels": labels.to(device)}
