"""What the HTTP layer asks of an engine: the `ServingEngine` protocol, the reply it gets back (`Generation`), and
the errors a request can meet on the way.

Every engine (tailor's own in engine.py, vLLM and llama.cpp in external.py) implements `ServingEngine` explicitly,
and the OpenAI layer (serve/openai/, serve/app.py) is typed against it alone, as vLLM's OpenAI entrypoints are
against its `EngineClient`: what an engine cannot do is a declared capability (`supports_logprobs = False`), never a
missing attribute that the caller has to sniff with `getattr`/`hasattr`.
"""

from __future__ import annotations

import queue
import time
from abc import abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from tailor.errors import TailorError


class UnknownModelError(TailorError):
    """The request named a model this engine does not serve."""


class PromptTooLongError(TailorError):
    """The conversation alone fills the model's context window."""


class UnsupportedRequestError(TailorError):
    """The model exists but cannot answer this kind of request (e.g. a prompt profile asked for raw completion);
    `param` names the request field at fault."""

    def __init__(self, message: str, param: str = "model"):
        super().__init__(message)
        self.param = param


class RetrievalUnavailableError(TailorError):
    """A grounded model could not retrieve (its index server is unreachable): the server, not the request, failed."""


class QueueFullError(TailorError):
    """Every decoding slot is busy and the waiting queue is full; try again after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


# per token: (id, logprob, [(id, logprob) of the most likely alternatives])
TokenLogprobs = tuple[int, float, list[tuple[int, float]]]

_END = object()  # the last item of a Generation's queue


def outside_vocabulary(ids: list[int], vocabulary: int) -> tuple[int, int] | None:
    """(position, id) of the first token id a tokenizer of `vocabulary` ids does not have; None when all are in."""
    return next(((position, token) for position, token in enumerate(ids) if not 0 <= token < vocabulary), None)


class Generation(Iterator[str]):
    """One reply being generated. Iterating yields text deltas; when it ends, `finish_reason` is "stop" (end of
    turn or a stop string), "length" (max_tokens or the context window), "timeout" (the request's time ran out;
    the text so far was delivered) or "cancelled" (closed), and `completion_tokens` is final.

    Timings (time.monotonic seconds): `created_at`, `first_token_at`, `finished_at`, and `token_times`, one per
    generated token, for time-to-first-token and inter-token latency metrics.

    The engine feeds it from its own thread with `push`, `push_error` and `end`; `on_close` (if given) is called
    when the reader closes it early, so the engine can drop the row before its next step."""

    def __init__(self, model: str, prompt_tokens: int, on_close: Callable[[], None] | None = None):
        self.model = model
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.created_at = time.monotonic()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.token_times: list[float] = []
        self._on_close = on_close
        self._deltas: queue.SimpleQueue = queue.SimpleQueue()
        self._done = False
        self.cancelled = False
        self.retrieval = None  # retrieval.Retrieval of a grounded model: the passages its prompt quoted
        self.grounding = None  # retrieval.Grounding that cites the finished text
        # with logprobs asked for: per reply token (id, logprob, [(id, logprob) of the top alternatives]), and with
        # prompt logprobs the prompt's ids and the same per prompt token (None for the first: nothing predicts it)
        self.logprobs: list[TokenLogprobs] | None = None
        self.prompt_ids: list[int] | None = None
        self.prompt_logprobs: list[TokenLogprobs | None] | None = None

    @classmethod
    def finished_with(cls, model: str, text: str, completion_tokens: int) -> Generation:
        """A reply decided without decoding (a grounded model abstaining): iterating yields `text` once."""
        generation = cls(model, 0)
        generation.push(text)
        generation.end()
        generation.finish_reason, generation.completion_tokens = "stop", completion_tokens
        generation.first_token_at = generation.finished_at = time.monotonic()
        return generation

    # ----- the engine's side -----

    def push(self, delta: str) -> None:
        """Hand the reader the next piece of text."""
        self._deltas.put(delta)

    def push_error(self, exc: BaseException) -> None:
        """The reader's next read raises `exc` (the forward pass failed)."""
        self._deltas.put(exc)

    def end(self) -> None:
        """No more text: the reader's iteration stops after what was pushed."""
        self._deltas.put(_END)

    # ----- the reader's side -----

    def quoted_text(self) -> str:
        """The passages a grounded model was given (what its answer may quote as it is); "" for other models."""
        return "\n".join(p.text for p in self.retrieval.passages) if self.retrieval is not None else ""

    def citations(self, text: str) -> list[dict] | None:
        """The sources of the finished reply `text` (None for a model without retrieval)."""
        return None if self.grounding is None else self.grounding.cite(text, self.retrieval)

    def __next__(self) -> str:
        if self._done:
            raise StopIteration
        item = self._deltas.get()
        if item is _END:
            self._done = True
            raise StopIteration
        if isinstance(item, BaseException):
            self._done = True
            raise item
        return item

    def text(self) -> str:
        """Run to the end and return the whole reply."""
        return "".join(self)

    def close(self) -> None:
        """Stop generating now (e.g. the client went away); the row leaves the batch before the next step."""
        if self.finish_reason is None:
            self.cancelled = True
            if self._on_close is not None:
                self._on_close()
        self._done = True

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.created_at


@runtime_checkable
class ServingEngine(Protocol):
    """What the OpenAI layer needs from an engine, and nothing else. Requests fail with the errors above, raised
    before the first token: `UnknownModelError` (404), `PromptTooLongError` and `UnsupportedRequestError` (400),
    `QueueFullError` (429), `RetrievalUnavailableError` (503)."""

    kind: str  # the `serve.engine` value: "tailor", "vllm" or "llama_cpp"
    base_name: str  # the base model's served name
    # the transformers tokenizer of the served models: token ids <-> text, and the chat template's special tokens
    # that the sanitizer refuses in user text
    tokenizer: Any
    # capabilities: a False one makes the OpenAI layer refuse the request field with a 400 naming it
    supports_logprobs: bool  # token logprobs and, with echo, prompt logprobs

    @property
    @abstractmethod
    def revision(self) -> int:
        """Bumped whenever a served name changes what it answers with: cached answers of an older revision are
        stale. A property, so an engine may derive it (the built-in one reads its customizations')."""

    @abstractmethod
    def model_names(self) -> list[str]:
        """The served names, the base model first."""

    @abstractmethod
    def stream(self, model: str, messages: list[dict], *, max_tokens: int | None = None, temperature: float = 1.0,
               top_p: float = 1.0, stop: list[str] | None = None, seed: int | None = None,
               timeout: float | None = None, logprobs: int | None = None) -> Generation:
        """Start a chat reply to `messages` (OpenAI's role/content dicts) with `model`'s chat template.
        `logprobs`: record each reply token's logprob and this many alternatives (None: none)."""

    @abstractmethod
    def complete(self, model: str, prompt: str | list[int], *, max_tokens: int | None = None,
                 temperature: float = 1.0, top_p: float = 1.0, stop: list[str] | None = None,
                 seed: int | None = None, timeout: float | None = None, logprobs: int | None = None,
                 echo: bool = False) -> Generation:
        """Continue raw text or token ids (no chat template). With `echo` and `logprobs`, score the prompt too."""

    @abstractmethod
    def outside_vocabulary(self, ids: list[int]) -> tuple[int, int] | None:
        """(position, id) of the first token id the served tokenizer does not have; None when all are in."""

    @abstractmethod
    def passage(self, chunk_id: str) -> dict | None:
        """The corpus chunk a citation's id points to, from a served model's index; None if no index has it."""

    @abstractmethod
    def add_adapter(self, name: str, folder: str | Path) -> None:
        """Serve `folder` as `name` from now on (replacing what `name` served); raises what it cannot load."""

    @abstractmethod
    def remove_adapter(self, name: str) -> None:
        """Stop serving `name`."""

    @abstractmethod
    def stats(self) -> dict:
        """Load figures for /metrics: running, waiting, max_batch_size, … ({} for an engine that keeps none)."""

    @abstractmethod
    def close(self) -> None:
        """Stop decoding and free the engine; unfinished replies end as "cancelled"."""
