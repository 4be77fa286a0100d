"""HTTP routes of the OpenAI-compatible API, feedback and admin. Thin on purpose: authorize, parse, hand to
serving.py, wrap the answer."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from tailor.errors import TailorError
from tailor.serve.openai import serving
from tailor.serve.openai.protocol import (
    AdapterRequest,
    ApiError,
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ErrorResponse,
    FeedbackReceipt,
    FeedbackRequest,
    ModelCard,
    ModelList,
    SourcePassage,
)
from tailor.serve.protocol import UnsupportedRequestError
from tailor.serve.security import Caller, bearer_token

router = APIRouter(prefix="/v1")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before trying again.", "schema": {"type": "string"}}}
# every error status a route can answer, as the OpenAPI schema documents it: each one carries ErrorResponse
ERROR_STATUSES: dict[int, dict[str, Any]] = {
    400: {"description": "The request is invalid; `error.param` names the field at fault."},
    401: {"description": "No API key, or an unknown one (only when the server has keys).",
          "headers": {"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}}},
    403: {"description": "The API key lacks the scope this route needs."},
    404: {"description": "What the request names (a model, a completion, a passage) does not exist here."},
    409: {"description": "The name is taken by the base model or an A/B alias."},
    413: {"description": "The request body is over serve.max_request_bytes."},
    429: {"description": "Over the key's rate limit (serve.rate_limit), or every decoding slot and queue place is "
                         "taken.", "headers": _RETRY_AFTER},
    503: {"description": "A grounded model could not retrieve: its index server is unreachable."},
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The `responses` of a route that may answer these error statuses."""
    return {status: {"model": ErrorResponse, **ERROR_STATUSES[status]} for status in statuses}


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


# with "stream": true a completion answers as server-sent events, which the schema must say as well as the JSON body
STREAMED: dict[int | str, dict[str, Any]] = {200: {"content": {"text/event-stream": {"schema": {"description": (
    "Events whose data is a chunk's JSON, one per delta, then [DONE]")}}}}}


def _events(result) -> StreamingResponse:
    return StreamingResponse(result, media_type="text/event-stream", headers=SSE_HEADERS)


@router.post("/chat/completions", response_model=None,
             responses=STREAMED | errors(400, 401, 403, 404, 413, 429, 503))
async def chat_completions(body: ChatCompletionRequest, request: Request,
                           caller: Caller = Depends(chat_scope)) -> ChatCompletion | StreamingResponse:
    _label(request, body.model)
    result = await serving.chat_request(services_of(request), body, caller)
    return _events(result) if body.stream else result


@router.post("/completions", response_model=None, responses=STREAMED | errors(400, 401, 403, 404, 413, 429))
async def completions(body: CompletionRequest, request: Request,
                      caller: Caller = Depends(chat_scope)) -> Completion | StreamingResponse:
    _label(request, body.model)
    result = await serving.completion_request(services_of(request), body, caller)
    return _events(result) if body.stream else result


@router.get("/models", responses=errors(401, 403, 429))
async def models(request: Request, caller: Caller = Depends(chat_scope)) -> ModelList:
    return serving.list_models(services_of(request))


@router.get("/sources/{chunk_id}", responses=errors(401, 403, 404, 429))
async def source_passage(chunk_id: str, request: Request, caller: Caller = Depends(chat_scope)) -> SourcePassage:
    """The whole passage a citation's `id` points to (a grounded answer's citation carries only a snippet)."""
    chunk = services_of(request).engine.passage(chunk_id)
    if chunk is None:
        raise ApiError(404, f"id: no passage '{chunk_id}' in the indexes of the served models", param="id",
                       code="source_not_found")
    return SourcePassage(**{key: chunk.get(key) for key in SourcePassage.model_fields})


@router.post("/feedback", responses=errors(400, 401, 403, 404, 413, 429))
async def feedback(body: FeedbackRequest, request: Request, caller: Caller = Depends(chat_scope)) -> FeedbackReceipt:
    """Thumbs up or down on a completion, with an optional correction; stored (and synced to disk) before the 200."""
    store = services_of(request).feedback
    feedback_id, model = await run_in_threadpool(
        store.add_feedback, response_id=body.response_id, rating=body.rating, correction=body.correction,
        comment=body.comment, user=body.user or (caller.key.name if caller.key else None))
    services_of(request).metrics.feedback.labels(model, body.rating).inc()
    return FeedbackReceipt(id=feedback_id, response_id=body.response_id, model=model, rating=body.rating)


@router.post("/admin/adapters", status_code=201, responses=errors(400, 401, 403, 409, 413, 429))
async def add_adapter(body: AdapterRequest, request: Request, caller: Caller = Depends(admin_scope)) -> ModelCard:
    """Serve another PEFT adapter on the base model, without a restart."""
    services = services_of(request)
    if body.name in services.aliases.names():
        raise ApiError(409, f"name: '{body.name}' is an A/B alias", param="name", code="name_taken")
    if body.name == services.engine.base_name:
        raise ApiError(409, f"name: '{body.name}' is the base model", param="name", code="name_taken")
    try:
        await run_in_threadpool(services.engine.add_adapter, body.name, body.path)
    except UnsupportedRequestError:
        raise  # the engine loads no adapters at all (llama.cpp): it names the field itself
    except TailorError as exc:  # the name is checked above: what is left is the folder
        raise ApiError(400, f"path: {exc}", param="path", code="invalid_adapter") from None
    services.cache.clear()  # a name served before may now mean different weights
    return ModelCard(id=body.name)


@router.delete("/admin/adapters/{name}", status_code=204, responses=errors(400, 401, 403, 404, 429))
async def remove_adapter(name: str, request: Request, caller: Caller = Depends(admin_scope)) -> Response:
    """Stop serving an adapter added at runtime or at start; requests already running finish first."""
    services = services_of(request)
    if name == services.engine.base_name:
        raise ApiError(400, f"name: the base model '{name}' cannot be removed", param="name", code="base_model")
    await run_in_threadpool(services.engine.remove_adapter, name)
    services.aliases.remove_model(name)
    services.cache.clear()
    return Response(status_code=204)
