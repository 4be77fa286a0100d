"""HTTP routes of the OpenAI-compatible API. Thin on purpose: parse, hand to serving.py, wrap the answer."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from tailor.serve.engine import Engine
from tailor.serve.openai import serving
from tailor.serve.openai.protocol import ChatCompletion, ChatCompletionRequest, ModelList

router = APIRouter(prefix="/v1")


def _engine(request: Request) -> Engine:
    return request.app.state.engine


@router.post("/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> ChatCompletion | StreamingResponse:
    if body.stream:
        return StreamingResponse(serving.complete_stream(_engine(request), body), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await serving.complete(_engine(request), body)


@router.get("/models")
async def models(request: Request) -> ModelList:
    return serving.list_models(_engine(request))
