"""Serving logic of the chat endpoints: a request becomes an engine call, and the engine's output becomes OpenAI's
shapes. Routing lives in routes.py; the shapes in protocol.py; the model in ..engine."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from starlette.concurrency import iterate_in_threadpool, run_in_threadpool

from tailor.serve.engine import Engine, Generation
from tailor.serve.openai.protocol import (AssistantMessage, ChatCompletion, ChatCompletionChunk,
                                          ChatCompletionRequest, Choice, ChunkChoice, Delta, ErrorBody,
                                          ErrorResponse, ModelCard, ModelList, Usage, completion_id, now)

log = logging.getLogger(__name__)


def list_models(engine: Engine) -> ModelList:
    return ModelList(data=[ModelCard(id=name) for name in engine.model_names()])


def _start(engine: Engine, request: ChatCompletionRequest) -> Generation:
    return engine.stream(request.model, [m.model_dump() for m in request.messages],
                         max_tokens=request.token_budget(), temperature=request.temperature, top_p=request.top_p,
                         stop=request.stop, seed=request.seed)


def _usage(generation: Generation) -> Usage:
    return Usage(prompt_tokens=generation.prompt_tokens, completion_tokens=generation.completion_tokens,
                 total_tokens=generation.prompt_tokens + generation.completion_tokens)


async def complete(engine: Engine, request: ChatCompletionRequest) -> ChatCompletion:
    generation = _start(engine, request)
    text = await run_in_threadpool(generation.text)  # the decode loop never runs on the event loop
    return ChatCompletion(model=request.model, usage=_usage(generation),
                          choices=[Choice(message=AssistantMessage(content=text),
                                          finish_reason=generation.finish_reason)])


def complete_stream(engine: Engine, request: ChatCompletionRequest) -> AsyncIterator[str]:
    """Server-sent events of a reply. Not itself async: an unknown model or an over-long prompt must raise here,
    while the HTTP status can still say so, not after the 200 has gone out."""
    generation = _start(engine, request)
    include_usage = bool(request.stream_options and request.stream_options.include_usage)
    return _events(generation, include_usage)


async def _events(generation: Generation, include_usage: bool) -> AsyncIterator[str]:
    chunk_id, created = completion_id(), now()

    def event(choices: list[ChunkChoice], usage: Usage | None = None) -> str:
        chunk = ChatCompletionChunk(id=chunk_id, created=created, model=generation.model, choices=choices,
                                    usage=usage)
        return f"data: {chunk.model_dump_json()}\n\n"

    try:
        yield event([ChunkChoice(delta=Delta(role="assistant", content=""))])
        # each next() runs in a worker thread: one token's forward pass at a time, off the event loop
        async for text in iterate_in_threadpool(generation):
            yield event([ChunkChoice(delta=Delta(content=text))])
        yield event([ChunkChoice(delta=Delta(), finish_reason=generation.finish_reason)])
        if include_usage:
            yield event([], usage=_usage(generation))
    except Exception as exc:  # the 200 is already sent: report in-band, as OpenAI does
        log.exception("generation failed mid-stream")
        error = ErrorResponse(error=ErrorBody(message=f"generation failed: {exc}", type="server_error"))
        yield f"data: {error.model_dump_json()}\n\n"
    finally:
        generation.close()  # a client that went away frees the model now, not at garbage collection
    yield "data: [DONE]\n\n"
