"""Serving logic of the completion endpoints: a request becomes an engine call, and the engine's output becomes
OpenAI's shapes. Routing lives in routes.py; the shapes in protocol.py; the engine is any ..protocol.ServingEngine.

Around the engine call, in order: the A/B alias picks a model, the sanitizer cleans the input, the response cache may
answer at once, the output filter redacts what goes out (streamed text too), and at the end the completion is
recorded (for feedback), logged (redacted) and measured.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from starlette.concurrency import iterate_in_threadpool, run_in_threadpool

from tailor.retrieval.grounding import is_abstention
from tailor.serve.ab import AliasRouter
from tailor.serve.cache import CachedAnswer, ResponseCache
from tailor.serve.feedback import FeedbackStore
from tailor.serve.filters import OutputFilter, StreamFilter
from tailor.serve.logs import RequestLog
from tailor.serve.metrics import ServerMetrics
from tailor.serve.openai.protocol import (
    ApiError,
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    Delta,
    ErrorBody,
    ErrorResponse,
    ModelCard,
    ModelList,
    SamplingRequest,
    TokenLogprob,
    TopLogprob,
    Usage,
    completion_id,
    now,
)
from tailor.serve.protocol import Generation, ServingEngine
from tailor.serve.security import Caller, KeyStore, RateLimiter, Sanitizer

log = logging.getLogger(__name__)


@dataclass
class Services:
    """Everything a request may need besides the engine; one per app."""

    engine: ServingEngine
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
    filtered: bool = False  # the output filter changed the text: its tokens' logprobs are not sent
    grounded: bool = False  # quality signals of a grounded model's answer, counted in /metrics
    retrieval_missed: bool = False
    abstained: bool = False

    def tick(self, metrics: ServerMetrics) -> None:
        moment = time.perf_counter()
        if self.last_token is None:  # set together with first_token, here only
            self.first_token = moment
            metrics.time_to_first_token.labels(self.model).observe(moment - self.started)
        else:
            metrics.inter_token_latency.labels(self.model).observe(moment - self.last_token)
        self.last_token = moment


def model_label(services: Services, name: str) -> str:
    """`name` when this server serves it (a model or an alias), else "-": metric labels stay bounded."""
    return name if name in services.engine.model_names() or name in services.aliases.names() else "-"


def _note_grounding(answer: Answer, generation: Generation, text: str) -> None:
    """A grounded answer's signals: did retrieval find nothing above the gate, did the answer abstain."""
    if generation.grounding is None or generation.retrieval is None:
        return
    answer.grounded = True
    answer.retrieval_missed = generation.retrieval.abstain
    answer.abstained = generation.retrieval.abstain or is_abstention(text, generation.grounding.settings.abstain_answer)


def _prepare(services: Services, request: SamplingRequest, caller: Caller, endpoint: str,
             prompt: list[dict]) -> Answer:
    model, alias = services.aliases.resolve(request.model, request.user or caller.identity)
    prefix = "chatcmpl" if endpoint == "chat" else "cmpl"
    return Answer(id=completion_id().replace("chatcmpl", prefix), endpoint=endpoint, model=model, alias=alias,
                  prompt=prompt, caller=caller, user=request.user)


def _check_options(request: ChatCompletionRequest | CompletionRequest) -> None:
    problem = request.option_problem()
    if problem is not None:
        field_name, message = problem
        raise ApiError(400, f"{field_name}: {message}", param=field_name, code="invalid_value")


def _check_engine(services: Services, request: ChatCompletionRequest | CompletionRequest) -> None:
    """Refuse what the engine declares it cannot do, naming the request field."""
    engine = services.engine
    if request.logprob_count() is not None and not engine.supports_logprobs:
        raise ApiError(400, f"logprobs: not available from serve.engine {engine.kind}; the built-in engine "
                            f"(serve.engine: tailor) returns them", param="logprobs", code="unsupported_request")


def _start(services: Services, answer: Answer, request: SamplingRequest,
           text_prompt: str | list[int] | None) -> Generation:
    """The engine call. Unknown models, over-long prompts and a full queue raise here, before any 200 is sent."""
    engine = services.engine
    scoring: dict[str, Any] = {} if request.logprob_count() is None else {"logprobs": request.logprob_count()}
    if text_prompt is None:
        generation = engine.stream(answer.model, answer.prompt, **request.sampling(), **scoring)
    else:
        if scoring and isinstance(request, CompletionRequest) and request.echo:
            scoring["echo"] = True
        generation = engine.complete(answer.model, text_prompt, **request.sampling(), **scoring)
    if generation.prompt_tokens > services.max_prompt_tokens:
        generation.close()
        param = "messages" if text_prompt is None else "prompt"
        raise ApiError(400, f"{param}: the prompt is {generation.prompt_tokens} tokens; this server accepts at most "
                            f"{services.max_prompt_tokens} (serve.max_prompt_tokens)", param=param,
                       code="context_length_exceeded")
    return generation


def _finish(services: Services, answer: Answer, text: str, finish_reason: str | None, prompt_tokens: int,
            completion_tokens: int, cache_key: str | None, citations: list[dict] | None = None) -> None:
    """Record, log and measure a finished answer. Runs on a worker thread: the database write syncs to disk."""
    ended = time.perf_counter()
    latency_ms = (ended - answer.started) * 1000
    first_ms = (answer.first_token - answer.started) * 1000 if answer.first_token else None
    metrics = services.metrics
    metrics.requests.labels(answer.model, answer.endpoint).inc()
    metrics.latency.labels(answer.model, answer.endpoint).observe(ended - answer.started)
    if not answer.cached:
        metrics.answered(answer.model, grounded=answer.grounded, retrieval_missed=answer.retrieval_missed,
                         abstained=answer.abstained, filtered=answer.filtered)
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
    # the cache keeps texts, not logprobs; echo is rebuilt from the prompt, but is rare enough not to cache
    if not services.cache.size or not request.deterministic() or request.logprob_count() is not None or \
            (isinstance(request, CompletionRequest) and request.echo):
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
        text = services.output_filter.apply("".join(raw), generation.quoted_text())
        answer.filtered = text != "".join(raw)
        _note_grounding(answer, generation, text)
        return text
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
    _check_options(request)
    _check_engine(services, request)
    messages = services.sanitizer.messages([m.model_dump() for m in request.messages],
                                           model_label(services, request.model))
    answer = _prepare(services, request, caller, "chat", messages)
    key = _cache_key(services, answer, request)
    hit = _cached(services, answer, key)
    # on a worker thread: the chat template, tokenizing and a prompt profile's retrieval all take CPU time
    generation = None if hit else await run_in_threadpool(_start, services, answer, request, None)
    if request.stream:
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        return _chat_events(services, answer, generation, hit, key, include_usage)
    return await _chat_whole(services, answer, generation, hit, key, request.logprob_count() is not None)


def _citations(generation: Generation | None, hit: CachedAnswer | None, text: str) -> list[dict] | None:
    """The sources of a finished reply of a grounded model (None for others): attributed to the text the client
    got, after the output filters."""
    if hit:
        return hit.citations
    assert generation is not None  # one of the two: an answer is either cached or generated
    return generation.citations(text)


async def _whole(services, answer: Answer, generation: Generation | None, hit: CachedAnswer | None,
                 key: str | None) -> tuple[str, str | None, int, int, list[dict] | None]:
    """The whole filtered reply (from the cache or the engine), recorded: text, finish reason, token counts and
    the sources of a grounded answer."""
    if hit:
        text = hit.text
    else:
        assert generation is not None  # one of the two: an answer is either cached or generated
        text = await run_in_threadpool(_collect, services, answer, generation)
    reason, prompt_tokens, completion_tokens = _outcome(generation, hit)
    citations = _citations(generation, hit, text)
    await run_in_threadpool(_finish, services, answer, text, reason, prompt_tokens, completion_tokens, key,
                            citations)
    return text, reason, prompt_tokens, completion_tokens, citations


def _token_text(services: Services, token: int) -> str:
    return services.engine.tokenizer.decode([token], skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _scored(answer: Answer, generation: Generation | None):
    """The reply's token logprobs, unless the output filter changed its text (redacted words must not come back as
    tokens) or the reply was not decoded (an abstention)."""
    return None if generation is None or answer.filtered else generation.logprobs


def _chat_logprobs(services: Services, scored) -> ChoiceLogprobs:
    def top(token: int, logprob: float) -> TopLogprob:
        text = _token_text(services, token)
        return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode()))

    return ChoiceLogprobs(content=None if scored is None else [
        TokenLogprob(**top(token, logprob).model_dump(), top_logprobs=[top(t, lp) for t, lp in alternatives])
        for token, logprob, alternatives in scored])


async def _chat_whole(services, answer: Answer, generation: Generation | None, hit: CachedAnswer | None,
                      key: str | None, with_logprobs: bool = False) -> ChatCompletion:
    text, reason, prompt_tokens, completion_tokens, citations = await _whole(services, answer, generation, hit, key)
    logprobs = _chat_logprobs(services, _scored(answer, generation)) if with_logprobs else None
    return ChatCompletion(id=answer.id, model=answer.model, usage=_usage(prompt_tokens, completion_tokens),
                          choices=[Choice(message=AssistantMessage(content=text), finish_reason=reason,
                                          logprobs=logprobs)],
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
# max_tokens, and a cancelled one (the client left) is never read; any other engine's reason (vLLM's "abort") ends
# the answer like a stop rather than failing the response schema
FINISH_REASONS = {"stop": "stop", "length": "length", "timeout": "length", "cancelled": "stop"}


def _outcome(generation: Generation | None, hit: CachedAnswer | None) -> tuple[str | None, int, int]:
    if hit:
        return hit.finish_reason, hit.prompt_tokens, hit.completion_tokens
    assert generation is not None  # one of the two: an answer is either cached or generated
    reason = generation.finish_reason
    return (reason if reason is None else FINISH_REASONS.get(reason, "stop"), generation.prompt_tokens,
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
    assert generation is not None  # one of the two: an answer is either cached or generated
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
        answer.filtered = stream_filter.text != stream_filter.raw
        _note_grounding(answer, generation, stream_filter.text)
        reason, prompt_tokens, completion_tokens = _outcome(generation, None)
        await run_in_threadpool(_finish, services, answer, stream_filter.text, reason, prompt_tokens,
                                completion_tokens, None if failed or generation.cancelled else key,
                                generation.citations(stream_filter.text))


# --- legacy completions -----------------------------------------------------------------------------------------


async def completion_request(services: Services, request: CompletionRequest, caller: Caller):
    """One choice per prompt (a string or token ids): all are submitted before any is read, so the engine decodes
    them in one batch (lm-evaluation-harness sends its requests this way)."""
    _check_options(request)
    _check_engine(services, request)
    prompts = request.prompts()
    texts = []
    for i, prompt in enumerate(prompts):
        param = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
        if isinstance(prompt, str):
            texts.append(services.sanitizer.text(prompt, param, model_label(services, request.model)))
        else:  # token ids are the model's own input: no chat template is applied, so no marker can fake a turn
            texts.append(_prompt_ids_text(services, prompt, param))
    answers: list[tuple[Answer, Generation | None, CachedAnswer | None, str | None]] = []
    for i, (prompt, text) in enumerate(zip(prompts, texts, strict=True)):
        answer = _prepare(services, request, caller, "completions", [{"role": "user", "content": text}])
        if i:
            answer.id = f"{answers[0][0].id}-{i}"  # one row per prompt in the feedback store and the log
        key = _cache_key(services, answer, request)
        hit = _cached(services, answer, key)
        generation = None if hit else await run_in_threadpool(
            _start, services, answer, request, text if isinstance(prompt, str) else prompt)
        answers.append((answer, generation, hit, key))
    if request.stream:
        answer, generation, hit, key = answers[0]
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        return _completion_events(services, answer, generation, hit, key, include_usage)
    choices, prompt_total, completion_total = [], 0, 0
    for index, ((answer, generation, hit, key), text) in enumerate(zip(answers, texts, strict=True)):
        reply, reason, prompt_tokens, completion_tokens, _ = await _whole(services, answer, generation, hit, key)
        prompt_total, completion_total = prompt_total + prompt_tokens, completion_total + completion_tokens
        logprobs = None
        if request.logprobs is not None:
            logprobs = _completion_logprobs(services, generation, answer, text if request.echo else None)
        choices.append(CompletionChoice(index=index, text=text + reply if request.echo else reply,
                                        finish_reason=reason, logprobs=logprobs))
    return Completion(id=answers[0][0].id, model=answers[0][0].model, usage=_usage(prompt_total, completion_total),
                      choices=choices)


def _prompt_ids_text(services: Services, ids: list[int], param: str) -> str:
    outside = services.engine.outside_vocabulary(ids)
    if outside is not None:  # checked before decoding: an unknown id cannot be decoded
        position, token = outside
        raise ApiError(400, f"{param}[{position}]: token id {token} is not in the vocabulary (0 to "
                            f"{len(services.engine.tokenizer) - 1})", param=param, code="invalid_value")
    return services.engine.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _completion_logprobs(services: Services, generation: Generation | None, answer: Answer,
                         echoed: str | None) -> CompletionLogprobs | None:
    """The legacy shape; with `echoed` (the prompt's text) the prompt's tokens come first."""
    scored = _scored(answer, generation)
    if scored is None:
        return None
    rows: list[tuple[int, float | None, list | None]] = []
    assert generation is not None  # scored: a decoded reply
    if echoed is not None and generation.prompt_ids is not None:
        assert generation.prompt_logprobs is not None  # set with prompt_ids
        rows += [(generation.prompt_ids[0], None, None)]
        # None only for the first prompt token: nothing predicts it
        rows += [(token, logprob, alternatives)
                 for token, logprob, alternatives in filter(None, generation.prompt_logprobs[1:])]
    rows += scored
    tokens = [_token_text(services, token) for token, _, _ in rows]
    offsets, offset = [], 0 if echoed is not None else len(answer.prompt[0]["content"])
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    return CompletionLogprobs(
        tokens=tokens, token_logprobs=[logprob for _, logprob, _ in rows],
        top_logprobs=[None if alternatives is None else {_token_text(services, t): lp for t, lp in alternatives}
                      for _, _, alternatives in rows],
        text_offset=offsets)


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
