"""Per-request token choice and text assembly: sampling parameters, stop strings, and turning token ids into the
text deltas a client sees. One `Decoder` per request; the batched engine calls `accept(token)` once per step."""

from __future__ import annotations

import time

import torch

from tailor.sentences import sentence_cut


def pick(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """Greedy at temperature 0; otherwise sample from the smallest set of tokens whose mass reaches top_p.
    `logits`: [vocab], float32."""
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1)  # [vocab]
    probs, order = probs.sort(descending=True)
    probs[(probs.cumsum(-1) - probs) >= top_p] = 0  # a token stays if the mass before it is under top_p
    mass = float(probs.sum())
    if not 0 < mass < float("inf"):  # a temperature so small that logits / temperature overflow: the greedy choice
        return int(logits.argmax())
    choice = torch.multinomial(probs, 1, generator=generator)
    return int(order[choice])


def first_stop(text: str, stop: list[str]) -> int | None:
    found = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(found) if found else None


def stop_prefix_length(text: str, stop: list[str]) -> int:
    """Length of the longest tail of `text` that is the start of some stop string."""
    return max((k for s in stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


class Decoder:
    """Turns one request's generated token ids into text deltas: it holds back a half-decoded character and any
    tail that may still grow into a stop string, and cuts the reply before the first stop string."""

    def __init__(self, tokenizer, end_of_turn_ids: set[int], max_tokens: int, stop: list[str],
                 sentences: int | None = None):
        self.tokenizer = tokenizer
        self.sentences = sentences  # stop once this many sentences are complete (None: no limit)
        self.end_of_turn_ids = end_of_turn_ids
        self.max_tokens = max_tokens
        self.stop = stop
        self.generated: list[int] = []
        self.text = ""
        self.emitted = ""
        self.token_times: list[float] = []

    def accept(self, token: int) -> tuple[str, str | None]:
        """Take the next token; returns (text delta to send now, finish reason or None to go on)."""
        if token in self.end_of_turn_ids:
            return self._rest(), "stop"
        self.generated.append(token)
        self.token_times.append(time.monotonic())
        # decode the whole reply each step: a character split over two tokens only appears once both are in
        self.text = self.tokenizer.decode(self.generated, skip_special_tokens=True,
                                          clean_up_tokenization_spaces=False)
        cut = first_stop(self.text, self.stop)
        sentence_end = sentence_cut(self.text, self.sentences)
        if sentence_end is not None and (cut is None or sentence_end < cut):
            cut = sentence_end
        if cut is not None:
            delta = self.text[len(self.emitted):cut] if cut > len(self.emitted) else ""
            self.emitted = self.text[:max(cut, len(self.emitted))]
            return delta, "stop"
        if len(self.generated) >= self.max_tokens:
            return self._rest(), "length"
        safe = self.text.rstrip("\ufffd")
        ready = len(safe) - stop_prefix_length(safe, self.stop)
        if ready > len(self.emitted) and self.text.startswith(self.emitted):
            delta = self.text[len(self.emitted):ready]
            self.emitted = self.text[:ready]
            return delta, None
        return "", None

    def _rest(self) -> str:
        """At the end of the reply, what was held back is final."""
        delta = self.text[len(self.emitted):] if len(self.text) > len(self.emitted) else ""
        self.emitted = self.text
        return delta
