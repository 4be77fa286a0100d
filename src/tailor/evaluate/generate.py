"""Batched greedy answers for evaluation (left-padded, so every row's answer starts at the same column)."""

from __future__ import annotations

import torch

from tailor.train.examples import chat_ids
from tailor.train.loop import autocast


@torch.no_grad()
def greedy_answers(model, tokenizer, conversations: list[list[dict]], *, max_new_tokens: int, batch_size: int,
                   compute_dtype: torch.dtype = torch.float32, on_batch=None) -> list[str]:
    device = next(model.parameters()).device
    prompts = [chat_ids(tokenizer, messages, add_generation_prompt=True) for messages in conversations]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: list[str] = [""] * len(prompts)
    model.eval()
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in rows)
        input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            input_ids[r, width - len(prompts[i]):] = torch.tensor(prompts[i])
            attention_mask[r, width - len(prompts[i]):] = 1
        with autocast(model, compute_dtype):
            output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                    max_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        for r, i in enumerate(rows):
            answers[i] = tokenizer.decode(output[r, width:], skip_special_tokens=True).strip()
        if on_batch is not None:
            on_batch(len(rows))
    return answers
