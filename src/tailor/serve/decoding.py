"""The forward passes of the running batches: prefill, one decoding step, token choice with its logprobs, and
speculative decoding by prompt lookup. What a chosen token does to its request (text, stop, finish) is the
scheduler's (scheduler.py); which weights and adapters a row runs through is the customizations' (customizations.py).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from tailor.serve.batching import DecodeBatch, GrowingCache, left_pad, positions_from_mask
from tailor.serve.customizations import Customizations
from tailor.serve.protocol import TokenLogprobs
from tailor.serve.sampling import pick


def end_of_turn_ids(tokenizer, configured: int | list[int] | None = None) -> set[int]:
    """Token ids that end a reply: the tokenizer's eos, the model's configured eos ids, and the chat template's
    end-of-turn marker, which is not always the tokenizer's eos."""
    ids = {tokenizer.eos_token_id}
    ids.update(configured if isinstance(configured, list) else [configured])
    for marker in ("<|im_end|>", "<|eot_id|>", "<|end|>"):
        token = tokenizer.convert_tokens_to_ids(marker)
        if isinstance(token, int) and token != tokenizer.unk_token_id:
            ids.add(token)
    return {i for i in ids if i is not None}


def token_logprobs(logits: torch.Tensor, tokens: list[int], top: int) -> list[TokenLogprobs]:
    """Each position's log-probability of its token and its `top` most likely tokens, from the raw logits
    [positions, vocab] (before temperature and top_p, as vLLM reports them)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [positions, vocab]
    chosen = logprobs.gather(1, torch.tensor(tokens, device=logits.device)[:, None])[:, 0].tolist()
    best_values, best_ids = logprobs.topk(top, dim=-1) if top else (logprobs[:, :0], logprobs[:, :0].long())
    return [(token, value, list(zip(ids, values, strict=True)))
            for token, value, ids, values in zip(tokens, chosen, best_ids.tolist(), best_values.tolist(),
                                                 strict=True)]


class Decoding:
    """Runs the model over the scheduler's rows (`scheduler.Request`s) and chooses their tokens. Called on the
    decode thread only, in inference mode, with the customizations' lock held."""

    def __init__(self, customizations: Customizations, pad_token_id: int | None, stop_ids: set[int],
                 speculative_tokens: int):
        self.customizations = customizations
        self.pad_token_id = pad_token_id
        self.stop_ids = stop_ids  # end-of-turn ids: a reply ends on them, and they carry no logprobs
        self.speculative_tokens = speculative_tokens
        self.speculation = {"steps": 0, "drafted": 0, "accepted": 0}  # speculative steps and their draft tokens
        self.peak_batch_size = 0  # the most rows one decoding step has run, for tests and benchmarks

    def prefill(self, backbone: str, kind: str, group: list) -> tuple[list[int], DynamicCache, torch.Tensor]:
        """Run the prompts of newly admitted requests of one model and one kind (ids, "soft_prompt" or "prefix"):
        records prompt logprobs where asked, and returns each row's first token, the cache and the attention
        mask [rows, columns] (rows left-padded)."""
        model = self.customizations.backbones[backbone]
        device = self.customizations.device
        if kind == "soft_prompt":
            embed = model.get_input_embeddings()
            rows = [torch.cat([r.custom.soft_prompt, embed(torch.tensor(r.prompt_ids, device=device))])
                    for r in group]
            inputs_embeds, mask = left_pad(rows)  # [rows, width, hidden]
            inputs = {"inputs_embeds": inputs_embeds}
        else:
            if self.pad_token_id is None:
                raise RuntimeError("batched prompts are left-padded, so the tokenizer needs a pad token id")
            ids, mask = left_pad([torch.tensor(r.prompt_ids, device=device) for r in group], self.pad_token_id)
            inputs = {"input_ids": ids}  # [rows, width]
        cache, new_columns = GrowingCache(), mask.shape[1]
        if kind == "prefix":
            # each row's prefix is its first cache entries, right-aligned; the gap to its padded prompt is masked
            def stacked(layer: int, kv: int) -> tuple[torch.Tensor, torch.Tensor]:
                padded, prefix_mask = left_pad([r.custom.prefix[layer][kv].transpose(0, 1) for r in group])
                return padded.transpose(1, 2), prefix_mask  # [rows, heads, virtual, head_dim], [rows, virtual]

            cache = GrowingCache([(stacked(i, 0)[0], stacked(i, 1)[0])
                                   for i in range(len(group[0].custom.prefix))])
            mask = torch.cat([stacked(0, 0)[1], mask], dim=1)
        scoring = any(r.prompt_logprobs for r in group)
        out = model(**inputs, attention_mask=mask, position_ids=positions_from_mask(mask)[:, -new_columns:],
                    cache=cache, use_cache=True, logits_to_keep=0 if scoring else 1,
                    **self._adapter_args(model, group))
        for row, request in enumerate(group):
            if request.prompt_logprobs:  # the prompt fills the row's last columns; column j predicts j + 1
                ids = request.prompt_ids
                scored = out.logits[row, -len(ids):-1]  # [prompt - 1, vocab]
                request.generation.prompt_logprobs = [None, *token_logprobs(scored, ids[1:], request.logprobs)]
        return self._choose(group, out.logits[:, -1]), out.cache, mask

    def step(self, backbone: str, batch: DecodeBatch) -> tuple[list[list[int]], int]:
        """One forward pass over a running batch: per row the tokens to hand on, in order (one; or, for a lone
        greedy row, the greedy tokens of a speculative step up to the first draft token that did not hold), and the
        number of draft tokens the step fed (their cache columns are rewound by those that are not used)."""
        model = self.customizations.backbones[backbone]
        draft = self._draft(batch)
        ids = torch.tensor([[r.next_token, *draft] for r in batch.rows],
                           device=self.customizations.device)  # [rows, 1 + draft]
        mask, positions = batch.step_inputs(ids.shape[1])
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=batch.cache,
                    use_cache=True, **self._adapter_args(model, batch.rows))
        batch.cache = out.cache
        self.peak_batch_size = max(self.peak_batch_size, len(batch.rows))
        if draft:
            return [self._verified(out.logits[0], draft)], len(draft)
        return [[token] for token in self._choose(batch.rows, out.logits[:, -1])], 0

    def accepted(self, draft_tokens: int) -> None:
        """Count the draft tokens of a speculative step that the reply kept."""
        self.speculation["accepted"] += draft_tokens

    def _adapter_args(self, model, requests: list) -> dict:
        return self.customizations.adapter_args(model, [r.custom.adapter_key for r in requests])

    def _choose(self, requests: list, logits: torch.Tensor) -> list[int]:
        """Each row's next token from its logits [rows, vocab], recording its logprobs where asked."""
        logits = logits.float()
        greedy = logits.argmax(-1).tolist()
        tokens = []
        for i, request in enumerate(requests):
            token = greedy[i] if request.temperature == 0 else pick(logits[i], request.temperature, request.top_p,
                                                                    request.generator)
            if request.logprobs is not None and token not in self.stop_ids:  # as the reply's tokens
                request.generation.logprobs += token_logprobs(logits[i:i + 1], [token], request.logprobs)
            tokens.append(token)
        return tokens

    def _draft(self, batch: DecodeBatch) -> list[int]:
        """Speculative decoding by prompt lookup (transformers' PromptLookupCandidateGenerator: the tokens that
        followed the first earlier occurrence of the last 3, 2 or 1 tokens, in the prompt or the reply). Only a batch
        of one greedy row: one row's step is bound by reading the weights, so checking more positions in the same
        forward pass costs little (default model, bf16: 4 positions 42.6 ms vs 1 position 40.3 ms with 2 threads;
        5 positions 1.12x one with 1 thread), and the draft tokens that match
        the model's own greedy choices are several tokens for one step. With more rows the step is compute-bound,
        and a sampled row's tokens would depend on whether it ran alone."""
        if (not self.speculative_tokens or len(batch.rows) != 1 or batch.rows[0].temperature != 0
                or batch.rows[0].logprobs is not None):  # a logprobs row records every position's distribution
            return []
        request = batch.rows[0]
        decoder = request.decoder
        room = min(self.speculative_tokens, decoder.max_tokens - len(decoder.generated) - 1)
        if room < 1:
            return []
        from transformers.generation.candidate_generator import PromptLookupCandidateGenerator

        context = torch.tensor([request.prompt_ids + decoder.generated])
        lookup = PromptLookupCandidateGenerator(eos_token_id=torch.tensor(sorted(self.stop_ids)),
                                                num_output_tokens=room, max_matching_ngram_size=3,
                                                max_length=context.shape[1] + room + 1)
        # transformers annotates torch.LongTensor, a legacy type no int64 tensor has for mypy
        candidates, _ = lookup.get_candidates(context)  # type: ignore[arg-type]
        return candidates[0, context.shape[1]:].tolist()

    def _verified(self, logits: torch.Tensor, draft: list[int]) -> list[int]:
        """The greedy tokens of a speculative step (`logits` [1 + draft, vocab]) worth handing on: each one that
        equals the draft token fed after it lets the next position count too."""
        greedy = logits.float().argmax(-1).tolist()
        self.speculation["steps"] += 1
        self.speculation["drafted"] += len(draft)
        for used, token in enumerate(greedy):
            if used == len(draft) or token != draft[used]:
                return greedy[:used + 1]
        raise AssertionError("unreachable: the last position always ends the loop")
