"""Serving logic of the completion endpoints: a request becomes an engine call, and the engine's output becomes
OpenAI's shapes. Routing lives in routes.py; the shapes in protocol.py; the model in ..engine.

Around the engine call, in order: the A/B alias picks a model, the sanitizer cleans the input, the response cache may
answer at once, the output filter redacts what goes out (streamed text too), and at the end the completion is
recorded (for feedback), logged (redacted) and measured.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

from starlette.concurrency import iterate_in_threadpool, run_in_threadpool

from tailor.serve.ab import AliasRouter
from tailor.serve.cache import CachedAnswer, ResponseCache
from tailor.serve.engine import Engine, Generation
from tailor.serve.feedback import FeedbackStore
from tailor.serve.filters import OutputFilter, StreamFilter
from tailor.serve.logs import RequestLog
from tailor.serve.metrics import ServerMetrics
from tailor.serve.openai.protocol import (ApiError, AssistantMessage, ChatCompletion, ChatCompletionChunk,
                                          ChatCompletionRequest, Choice, ChunkChoice, Completion, CompletionChoice,
                                          CompletionRequest, Delta, ErrorBody, ErrorResponse, ModelCard, ModelList,
                                          SamplingRequest, Usage, completion_id, now)
from tailor.serve.security import Caller, KeyStore, RateLimiter, Sanitizer

log = logging.getLogger(__name__)


@dataclass
class Services:
    """Everything a request may need besides the engine; one per app."""

    engine: Engine
    sanitizer: Sanitizer
    output_filter: OutputFilter
    cache: ResponseCache
    metrics: ServerMetrics
    feedback: FeedbackStore
    request_log: RequestLog
    aliases: AliasRouter
    limiter: RateLimiter
    keys: KeyStore | None
    max_prompt_tokens: int
    default_model: str | None = None  # the workspace's customized model: the chat page opens on it


def list_models(services: Services) -> ModelList:
    names = [*services.engine.model_names(), *services.aliases.names()]
    default = services.default_model if services.default_model in names else None
    return ModelList(data=[ModelCard(id=name) for name in names], default=default)


@dataclass
class Answer:
    """One completion on its way out: who asked for what, and its timings as the text arrives."""

    id: str
    endpoint: str  # "chat" or "completions"
    model: str
    alias: str | None
    prompt: list[dict]
    caller: Caller
    user: str | None
    started: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    last_token: float | None = None
    cached: bool = False

    def tick(self, metrics: ServerMetrics) -> None:
        moment = time.perf_counter()
        if self.first_token is None:
            self.first_token = moment
            metrics.time_to_first_token.labels(self.model).observe(moment - self.started)
        else:
            metrics.inter_token_latency.labels(self.model).observe(moment - self.last_token)
        self.last_token = moment


def _prepare(services: Services, request: SamplingRequest, caller: Caller, endpoint: str,
             prompt: list[dict]) -> Answer:
    model, alias = services.aliases.resolve(request.model, request.user or caller.identity)
    prefix = "chatcmpl" if endpoint == "chat" else "cmpl"
    return Answer(id=completion_id().replace("chatcmpl", prefix), endpoint=endpoint, model=model, alias=alias,
                  prompt=prompt, caller=caller, user=request.user)


def _start(services: Services, answer: Answer, request: SamplingRequest, text_prompt: str | None) -> Generation:
    """The engine call. Unknown models, over-long prompts and a full queue raise here, before any 200 is sent."""
    engine = services.engine
    if text_prompt is None:
        generation = engine.stream(answer.model, answer.prompt, **request.sampling())
    else:
        generation = engine.complete(answer.model, text_prompt, **request.sampling())
    if generation.prompt_tokens > services.max_prompt_tokens:
        generation.close()
        param = "messages" if text_prompt is None else "prompt"
        raise ApiError(400, f"{param}: the prompt is {generation.prompt_tokens} tokens; this server accepts at most "
                            f"{services.max_prompt_tokens} (serve.max_prompt_tokens)", param=param,
                       code="context_length_exceeded")
    return generation


def _finish(services: Services, answer: Answer, text: str, finish_reason: str, prompt_tokens: int,
            completion_tokens: int, cache_key: str | None, citations: list[dict] | None = None) -> None:
    """Record, log and measure a finished answer. Runs on a worker thread: the database write syncs to disk."""
    ended = time.perf_counter()
    latency_ms = (ended - answer.started) * 1000
    first_ms = (answer.first_token - answer.started) * 1000 if answer.first_token else None
    metrics = services.metrics
    metrics.requests.labels(answer.model, answer.endpoint).inc()
    if not answer.cached:
        metrics.tokens.labels(answer.model).inc(completion_tokens)
        if answer.first_token and completion_tokens and ended > answer.started:
            metrics.throughput.labels(answer.model).observe(completion_tokens / (ended - answer.started))
        if cache_key is not None and finish_reason is not None:
            services.cache.put(cache_key, CachedAnswer(text, finish_reason, prompt_tokens, completion_tokens,
                                                       citations))
    services.feedback.record_completion(
        id=answer.id, model=answer.model, alias=answer.alias, endpoint=answer.endpoint, prompt=answer.prompt,
        answer=text, user=answer.user, latency_ms=latency_ms, first_token_ms=first_ms,
        completion_tokens=completion_tokens)
    services.request_log.write(event="completion", id=answer.id, endpoint=answer.endpoint, model=answer.model,
                               alias=answer.alias, key=answer.caller.key.name if answer.caller.key else None,
                               prompt=answer.prompt, answer=text, finish_reason=finish_reason,
                               prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                               latency_ms=round(latency_ms, 1), cached=answer.cached,
                               first_token_ms=round(first_ms, 1) if first_ms is not None else None,
                               **({} if citations is None else {"sources": [c["source"] for c in citations]}))


def _cache_key(services: Services, answer: Answer, request: SamplingRequest) -> str | None:
    if not services.cache.size or not request.deterministic():
        return None
    # the engine's revision: a hot-swapped version (registry promote/rollback) must not answer from the old one's cache
    return services.cache.key(answer.endpoint, f"{answer.model}@{services.engine.revision}", answer.prompt,
                              request.sampling())


def _cached(services: Services, answer: Answer, key: str | None) -> CachedAnswer | None:
    if key is None:
        return None
    hit = services.cache.get(key)
    (services.metrics.cache_hits if hit else services.metrics.cache_misses).inc()
    answer.cached = hit is not None
    return hit


def _usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens)


def _collect(services: Services, answer: Answer, generation: Generation) -> str:
    """The whole reply, timed per delta (on a worker thread: the decode loop never runs on the event loop)."""
    try:
        raw = []
        for delta in generation:
            answer.tick(services.metrics)
            raw.append(delta)
        return services.output_filter.apply("".join(raw), generation.quoted_text())
    finally:
        generation.close()


def _filtered_deltas(services: Services, answer: Answer, generation: Generation,
                     stream_filter: StreamFilter) -> Iterator[str]:
    """Text ready to send. Runs on worker threads, filter included: the PII detectors must not stall the loop."""
    for delta in generation:
        answer.tick(services.metrics)
        text = stream_filter.push(delta)
        if text:
            yield text
    rest = stream_filter.finish()
    if rest:
        yield rest


# --- chat completions -----------------------------------------------------------------------------------------


async def chat_request(services: Services, request: ChatCompletionRequest, caller: Caller):
    """A whole reply, or for `stream` an async iterator of server-sent events. Everything up to the first token
    happens before this returns, so ApiError (and the engine's errors) still become the HTTP status."""
    messages = services.sanitizer.messages([m.model_dump() for m in request.messages])
    answer = _prepare(services, request, caller, "chat", messages)
    key = _cache_key(services, answer, request)
    hit = _cached(services, answer, key)
    # on a worker thread: the chat template, tokenizing and a prompt profile's retrieval all take CPU time
    generation = None if hit else await run_in_threadpool(_start, services, answer, request, None)
    if request.stream:
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        return _chat_events(services, answer, generation, hit, key, include_usage)
    return await _chat_whole(services, answer, generation, hit, key)


def _citations(generation: Generation | None, hit: CachedAnswer | None, text: str) -> list[dict] | None:
    """The sources of a finished reply of a grounded model (None for others): attributed to the text the client
    got, after the output filters."""
    return hit.citations if hit else generation.citations(text)


async def _whole(services, answer: Answer, generation: Generation | None, hit: CachedAnswer | None,
                 key: str | None) -> tuple[str, str | None, int, int, list[dict] | None]:
    """The whole filtered reply (from the cache or the engine), recorded: text, finish reason, token counts and
    the sources of a grounded answer."""
    text = hit.text if hit else await run_in_threadpool(_collect, services, answer, generation)
    reason, prompt_tokens, completion_tokens = _outcome(generation, hit)
    citations = _citations(generation, hit, text)
    await run_in_threadpool(_finish, services, answer, text, reason, prompt_tokens, completion_tokens, key,
                            citations)
    return text, reason, prompt_tokens, completion_tokens, citations


async def _chat_whole(services, answer: Answer, generation: Generation | None, hit: CachedAnswer | None,
                      key: str | None) -> ChatCompletion:
    text, reason, prompt_tokens, completion_tokens, citations = await _whole(services, answer, generation, hit, key)
    return ChatCompletion(id=answer.id, model=answer.model, usage=_usage(prompt_tokens, completion_tokens),
                          choices=[Choice(message=AssistantMessage(content=text), finish_reason=reason)],
                          citations=citations)


async def _chat_events(services, answer: Answer, generation: Generation | None, hit: CachedAnswer | None,
                       key: str | None, include_usage: bool) -> AsyncIterator[str]:
    created = now()

    def event(choices: list[ChunkChoice], usage: Usage | None = None, citations: list[dict] | None = None) -> str:
        chunk = ChatCompletionChunk(id=answer.id, created=created, model=answer.model, choices=choices, usage=usage,
                                    citations=citations)
        return f"data: {chunk.model_dump_json()}\n\n"

    def piece(text: str) -> str:
        return event([ChunkChoice(delta=Delta(content=text))])

    yield event([ChunkChoice(delta=Delta(role="assistant", content=""))])
    sent: list[str] = []
    async for text in _streamed(services, answer, generation, hit, key, piece, sent):
        yield text
    reason, prompt_tokens, completion_tokens = _outcome(generation, hit)
    # the sources ride on the chunk that ends the reply, attributed to the whole text the client received
    yield event([ChunkChoice(delta=Delta(), finish_reason=reason)], citations=_citations(generation, hit,
                                                                                          "".join(sent)))
    if include_usage:
        yield event([], usage=_usage(prompt_tokens, completion_tokens))
    yield "data: [DONE]\n\n"


# OpenAI's clients know "stop" and "length": a reply cut by the request's time limit is cut short like one cut by
# max_tokens, and a cancelled one (the client left) is never read
FINISH_REASONS = {"stop": "stop", "length": "length", "timeout": "length", "cancelled": "stop"}


def _outcome(generation: Generation | None, hit: CachedAnswer | None) -> tuple[str | None, int, int]:
    if hit:
        return hit.finish_reason, hit.prompt_tokens, hit.completion_tokens
    return (FINISH_REASONS.get(generation.finish_reason, generation.finish_reason), generation.prompt_tokens,
            generation.completion_tokens)


async def _streamed(services: Services, answer: Answer, generation: Generation | None, hit: CachedAnswer | None,
                    key: str | None, piece: Callable[[str], str], sent: list[str] | None = None
                    ) -> AsyncIterator[str]:
    """The filtered text as server-sent events; records the answer at the end, even a client that left early.
    `sent` collects the text pieces as they go out."""
    sent = [] if sent is None else sent
    if hit:
        sent.append(hit.text)
        yield piece(hit.text)
        await run_in_threadpool(_finish, services, answer, hit.text, hit.finish_reason, hit.prompt_tokens,
                                hit.completion_tokens, key, hit.citations)
        return
    stream_filter = services.output_filter.stream(generation.quoted_text())
    failed = False
    try:
        # each next() runs in a worker thread: one token's forward pass at a time, off the event loop
        async for text in iterate_in_threadpool(_filtered_deltas(services, answer, generation, stream_filter)):
            sent.append(text)
            yield piece(text)
    except Exception as exc:  # the 200 is already sent: report in-band, as OpenAI does
        failed = True
        log.exception("generation failed mid-stream")
        services.metrics.errors.labels(answer.model, "500").inc()
        error = ErrorResponse(error=ErrorBody(message=f"generation failed: {exc}", type="server_error"))
        yield f"data: {error.model_dump_json()}\n\n"
    finally:
        generation.close()  # a client that went away frees the model now, not at garbage collection
        stream_filter.finish()
        reason, prompt_tokens, completion_tokens = _outcome(generation, None)
        await run_in_threadpool(_finish, services, answer, stream_filter.text, reason, prompt_tokens,
                                completion_tokens, None if failed or generation.cancelled else key,
                                generation.citations(stream_filter.text))


# --- legacy completions -----------------------------------------------------------------------------------------


async def completion_request(services: Services, request: CompletionRequest, caller: Caller):
    prompt = services.sanitizer.text(request.prompt, "prompt")
    answer = _prepare(services, request, caller, "completions", [{"role": "user", "content": prompt}])
    key = _cache_key(services, answer, request)
    hit = _cached(services, answer, key)
    generation = None if hit else await run_in_threadpool(_start, services, answer, request, prompt)
    if request.stream:
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        return _completion_events(services, answer, generation, hit, key, include_usage)
    return await _completion_whole(services, answer, generation, hit, key)


async def _completion_whole(services, answer: Answer, generation: Generation | None, hit: CachedAnswer | None,
                            key: str | None) -> Completion:
    text, reason, prompt_tokens, completion_tokens, _ = await _whole(services, answer, generation, hit, key)
    return Completion(id=answer.id, model=answer.model, usage=_usage(prompt_tokens, completion_tokens),
                      choices=[CompletionChoice(text=text, finish_reason=reason)])


async def _completion_events(services, answer: Answer, generation: Generation | None, hit: CachedAnswer | None,
                             key: str | None, include_usage: bool) -> AsyncIterator[str]:
    created = now()

    def event(choices: list[CompletionChoice], usage: Usage | None = None) -> str:
        chunk = Completion(id=answer.id, created=created, model=answer.model, choices=choices, usage=usage)
        return f"data: {chunk.model_dump_json()}\n\n"

    async for text in _streamed(services, answer, generation, hit, key,
                                lambda text: event([CompletionChoice(text=text, finish_reason=None)])):
        yield text
    reason, prompt_tokens, completion_tokens = _outcome(generation, hit)
    yield event([CompletionChoice(text="", finish_reason=reason)])
    if include_usage:
        yield event([], usage=_usage(prompt_tokens, completion_tokens))
    yield "data: [DONE]\n\n"
