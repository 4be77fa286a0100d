"""HTTP routes of the OpenAI-compatible API, feedback and admin. Thin on purpose: authorize, parse, hand to
serving.py, wrap the answer."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from tailor.serve.openai import serving
from tailor.serve.openai.protocol import (AdapterRequest, ApiError, ChatCompletion, ChatCompletionRequest,
                                          Completion, CompletionRequest, FeedbackReceipt, FeedbackRequest, ModelCard,
                                          ModelList, SourcePassage)
from tailor.serve.security import Caller, bearer_token

router = APIRouter(prefix="/v1")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def services_of(request: Request) -> serving.Services:
    return request.app.state.services


def authorize(request: Request, scope: str, *, limited: bool = True) -> Caller:
    """The caller behind a request: 401 without a valid key, 403 without the scope, 429 over its rate limit.
    Without keys nothing is limited: the server then listens on 127.0.0.1 only, for this machine's own use."""
    services = services_of(request)
    if services.keys is None:
        caller = Caller(identity=f"ip:{request.client.host if request.client else '-'}")
    else:
        token = bearer_token(request.headers.get("authorization"), request.headers.get("x-api-key"))
        if not token:
            raise ApiError(401, "missing API key: send it as 'Authorization: Bearer KEY'", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
        key = services.keys.find(token)
        if key is None:
            raise ApiError(401, "invalid API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        if not key.allows(scope):
            raise ApiError(403, f"this key lacks the '{scope}' scope", type="permission_error",
                           code="insufficient_scope")
        caller = Caller(identity=f"key:{key.name}", key=key)
    request.state.caller = caller  # the request log names the key, never the key itself
    if limited and caller.key is not None:
        services.limiter.hit(caller)
    return caller


def chat_scope(request: Request) -> Caller:
    return authorize(request, "chat")


def admin_scope(request: Request) -> Caller:
    return authorize(request, "admin")


def metrics_scope(request: Request) -> Caller:
    """Scrapers poll often: /metrics needs the admin scope (when keys are set) but no rate limit."""
    return authorize(request, "admin", limited=False)


def _label(request: Request, model: str) -> None:
    """Error counts name the model when it is one this server has (never an arbitrary client string)."""
    services = services_of(request)
    if model in services.engine.model_names() or model in services.aliases.names():
        request.state.model = model


def _events(result) -> StreamingResponse:
    return StreamingResponse(result, media_type="text/event-stream", headers=SSE_HEADERS)


@router.post("/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request,
                           caller: Caller = Depends(chat_scope)) -> ChatCompletion | StreamingResponse:
    _label(request, body.model)
    result = await serving.chat_request(services_of(request), body, caller)
    return _events(result) if body.stream else result


@router.post("/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request,
                      caller: Caller = Depends(chat_scope)) -> Completion | StreamingResponse:
    _label(request, body.model)
    result = await serving.completion_request(services_of(request), body, caller)
    return _events(result) if body.stream else result


@router.get("/models")
async def models(request: Request, caller: Caller = Depends(chat_scope)) -> ModelList:
    return serving.list_models(services_of(request))


@router.get("/sources/{chunk_id}")
async def source_passage(chunk_id: str, request: Request, caller: Caller = Depends(chat_scope)) -> SourcePassage:
    """The whole passage a citation's `id` points to (a grounded answer's citation carries only a snippet)."""
    chunk = services_of(request).engine.passage(chunk_id)
    if chunk is None:
        raise ApiError(404, f"id: no passage '{chunk_id}' in the indexes of the served models", param="id",
                       code="source_not_found")
    return SourcePassage(**{key: chunk.get(key) for key in SourcePassage.model_fields})


@router.post("/feedback")
async def feedback(body: FeedbackRequest, request: Request, caller: Caller = Depends(chat_scope)) -> FeedbackReceipt:
    """Thumbs up or down on a completion, with an optional correction; stored (and synced to disk) before the 200."""
    store = services_of(request).feedback
    feedback_id, model = await run_in_threadpool(
        store.add_feedback, response_id=body.response_id, rating=body.rating, correction=body.correction,
        comment=body.comment, user=body.user or (caller.key.name if caller.key else None))
    services_of(request).metrics.feedback.labels(model, body.rating).inc()
    return FeedbackReceipt(id=feedback_id, response_id=body.response_id, model=model, rating=body.rating)


@router.post("/admin/adapters", status_code=201)
async def add_adapter(body: AdapterRequest, request: Request, caller: Caller = Depends(admin_scope)) -> ModelCard:
    """Serve another PEFT adapter on the base model, without a restart."""
    services = services_of(request)
    if body.name in services.aliases.names():
        raise ApiError(409, f"name: '{body.name}' is an A/B alias", param="name", code="name_taken")
    await run_in_threadpool(services.engine.add_adapter, body.name, body.path)
    services.cache.clear()  # a name served before may now mean different weights
    return ModelCard(id=body.name)


@router.delete("/admin/adapters/{name}", status_code=204)
async def remove_adapter(name: str, request: Request, caller: Caller = Depends(admin_scope)) -> Response:
    services = services_of(request)
    await run_in_threadpool(services.engine.remove_adapter, name)
    services.aliases.remove_model(name)
    services.cache.clear()
    return Response(status_code=204)
