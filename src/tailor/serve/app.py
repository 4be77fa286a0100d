"""The web application: the OpenAI-compatible API under /v1 (chat and legacy completions, models, feedback, admin),
a health check, Prometheus metrics, the chat page at /, and the operations console at /admin (its API under
/admin/api: serve/admin/).

Every error leaves in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, so OpenAI clients show the
message instead of failing to parse it; a bad request is a 4xx naming the field, never a 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import math
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from tailor.config import ServeConfig
from tailor.errors import TailorError
from tailor.registry import Registry
from tailor.serve.ab import AliasRouter
from tailor.serve.admin.console import Console
from tailor.serve.admin.history import MetricsHistory
from tailor.serve.admin.routes import router as admin_router
from tailor.serve.cache import ResponseCache
from tailor.serve.feedback import FeedbackStore, UnknownResponseError
from tailor.serve.filters import OutputFilter
from tailor.serve.logs import RequestLog
from tailor.serve.metrics import ServerMetrics
from tailor.serve.openai.protocol import ApiError, ErrorBody, ErrorResponse
from tailor.serve.openai.routes import metrics_scope, router
from tailor.serve.openai.serving import Services
from tailor.serve.protocol import (
    PromptTooLongError,
    QueueFullError,
    RetrievalUnavailableError,
    ServingEngine,
    UnknownModelError,
    UnsupportedRequestError,
)
from tailor.serve.security import Caller, KeyStore, RateLimiter, Sanitizer

log = logging.getLogger(__name__)


def build_services(engine: ServingEngine, config: ServeConfig, root: Path, state_dir: Path | None = None) -> Services:
    """Everything but the engine, from `serve.*`. The key file is relative to the workspace `root`; the feedback
    database and the request log to `state_dir` (the served run folder; default `root`). A bad setting is a
    TailorError naming its key, before the server listens."""
    state_dir = state_dir or root

    def where(path: str, folder: Path) -> Path | str:
        return path if path == ":memory:" else folder / path

    metrics = ServerMetrics()
    return Services(
        engine=engine,
        sanitizer=Sanitizer.for_tokenizer(engine.tokenizer, config.max_turns, config.max_turn_chars,
                                          metrics),
        output_filter=OutputFilter(config.redact_pii, config.blocklist, config.pii_keep or []),
        cache=ResponseCache(config.cache_size),
        metrics=metrics,
        feedback=FeedbackStore(where(config.feedback_db, state_dir)),
        request_log=RequestLog(where(config.request_log, state_dir) if config.request_log else None),
        aliases=AliasRouter(config.aliases, engine.model_names()),
        limiter=RateLimiter(config.rate_limit, metrics),
        keys=KeyStore.load(where(config.api_key_file, root)) if config.api_key_file else None,
        max_prompt_tokens=config.max_prompt_tokens,
        # the run's own customization is the engine's last name (tailor chat's default too)
        default_model=engine.model_names()[-1])


def create_app(engine: ServingEngine, config: ServeConfig | None = None, root: Path | str = ".",
               state_dir: Path | str | None = None, watcher=None, registry: Registry | None = None) -> FastAPI:
    """The app for `engine`. Without a config: no keys, an in-memory feedback database and no request log.
    `watcher`: the RegistryWatcher following the registry, which routes canaries through this app's aliases.
    `registry`: the one the /admin console shows and changes (default: the watcher's; none: its registry screens
    are empty). `root`: the workspace, whose run folders the console lists."""
    config = config or ServeConfig(feedback_db=":memory:", request_log=None)
    services = build_services(engine, config, Path(root), Path(state_dir) if state_dir else None)
    if watcher is not None:
        watcher.aliases = services.aliases
        watcher.sync()  # a canary already running is routed before the first request
    history = MetricsHistory(services.metrics, interval=config.monitor_sample_seconds)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        sampling = asyncio.create_task(history.run())  # the console's graphs, read while the server runs
        try:
            yield
        finally:
            sampling.cancel()

    # no /docs: Swagger UI loads its scripts from a CDN, and the server must work offline
    app = FastAPI(title="tailor", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.services = services
    app.state.engine = engine
    app.state.console = Console(Path(root), services, registry or (watcher.registry if watcher else None), history)
    app.include_router(router)
    app.include_router(admin_router)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    web = resources.files("tailor.serve").joinpath("web")
    chat_page = web.joinpath("index.html").read_text(encoding="utf-8")
    console_page = web.joinpath("admin.html").read_text(encoding="utf-8")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "models": engine.model_names()}

    @app.get("/metrics", include_in_schema=False)
    async def metrics(caller: Caller = Depends(metrics_scope)) -> Response:
        services.metrics.engine_figures(engine.stats())
        return Response(services.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def chat() -> str:
        return chat_page

    @app.get("/admin", response_class=HTMLResponse, include_in_schema=False)
    async def console() -> str:
        return console_page  # the page holds no data: each screen asks /admin/api with the key typed into it

    # each handler takes the class it is registered for (Starlette types them all as taking Exception); Starlette
    # picks the handler of the nearest class in the exception's MRO, so TailorError's does not shadow its subclasses'
    handlers: dict[type[Exception], Callable[[Request, Any], Awaitable[JSONResponse]]] = {
        ApiError: _api_error, RequestValidationError: _invalid_request, UnknownModelError: _unknown_model,
        PromptTooLongError: _prompt_too_long, QueueFullError: _queue_full, UnsupportedRequestError: _unsupported,
        RetrievalUnavailableError: _retrieval_unavailable, UnknownResponseError: _unknown_response,
        TailorError: _bad_request, HTTPException: _http_error, Exception: _server_error}
    for exception_class, handler in handlers.items():
        app.add_exception_handler(exception_class, handler)
    if config.cors_origins:  # off unless asked for: a browser page from another origin must not use the keys
        app.add_middleware(CORSMiddleware, allow_origins=config.cors_origins, allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["Authorization", "Content-Type", "X-Api-Key"])
    app.add_middleware(BodySizeLimit, max_bytes=config.max_request_bytes)
    app.add_middleware(AccessLog, services=services)
    return app


class BodySizeLimit:
    """413 for a body over the limit, whether it announces its length or streams in chunks (pure ASGI: the body
    is counted as it arrives, never buffered here)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        too_big = ApiError(413, f"the request body is over {self.max_bytes} bytes (serve.max_request_bytes)",
                           code="request_too_large")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await _error(too_big.status, too_big.body)(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise too_big
            return message

        await self.app(scope, counted, send)


class AccessLog:
    """One structured line per request (method, path, status, duration, key name), and error counts by status."""

    def __init__(self, app, services: Services):
        self.app, self.services = app, services

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), 500

        async def sending(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            state = scope.get("state", {})
            caller = state.get("caller")
            self.services.metrics.responses.labels(state.get("model", "-"), f"{status // 100}xx").inc()
            if status >= 400:
                self.services.metrics.errors.labels(state.get("model", "-"), str(status)).inc()
            self.services.request_log.write(
                event="request", method=scope["method"], path=scope["path"], status=status,
                duration_ms=round((time.perf_counter() - started) * 1000, 1),
                key=caller.key.name if caller is not None and caller.key else None)


def _error(status: int, body: ErrorBody, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse(ErrorResponse(error=body).model_dump(), status_code=status, headers=headers)


def _field(loc: tuple) -> str:
    """("body", "messages", 0, "role") -> "messages[0].role"; ("path", "version") -> "version"."""
    name = ""
    for part in loc[1:] if loc and loc[0] in ("body", "path", "query") else loc:
        name += f"[{part}]" if isinstance(part, int) else f".{part}" if name else str(part)
    return name or "body"


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return _error(exc.status, exc.body, exc.headers)


async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = exc.errors()
    if problems and problems[0]["type"] == "json_invalid":
        detail = problems[0].get("ctx", {}).get("error", "")
        return _error(400, ErrorBody(message=f"the request body is not valid JSON ({detail})", code="invalid_json"))
    if problems and problems[0]["loc"] == ("body",):
        return _error(400, ErrorBody(message="the request body must be a JSON object (Content-Type: "
                                             "application/json)", code="invalid_json"))
    fields = [_field(p["loc"]) for p in problems]
    message = "; ".join(f"{field}: {p['msg']}" for field, p in zip(fields, problems, strict=True))
    return _error(400, ErrorBody(message=message, param=fields[0] if fields else None, code="invalid_value"))


async def _unknown_model(request: Request, exc: UnknownModelError) -> JSONResponse:
    return _error(404, ErrorBody(message=str(exc), param="model", code="model_not_found"))


async def _prompt_too_long(request: Request, exc: PromptTooLongError) -> JSONResponse:
    param = "prompt" if request.url.path.endswith("/v1/completions") else "messages"
    return _error(400, ErrorBody(message=str(exc), param=param, code="context_length_exceeded"))


async def _unsupported(request: Request, exc: UnsupportedRequestError) -> JSONResponse:
    return _error(400, ErrorBody(message=str(exc), param=exc.param, code="unsupported_request"))


async def _retrieval_unavailable(request: Request, exc: RetrievalUnavailableError) -> JSONResponse:
    return _error(503, ErrorBody(message=f"retrieval failed: {exc}", type="server_error",
                                 code="retrieval_unavailable"))


async def _queue_full(request: Request, exc: QueueFullError) -> JSONResponse:
    retry = max(1, math.ceil(exc.retry_after))
    return _error(429, ErrorBody(message=f"the server is busy; retry in {retry} s", type="rate_limit_error",
                                 code="queue_full"), {"Retry-After": str(retry)})


async def _unknown_response(request: Request, exc: UnknownResponseError) -> JSONResponse:
    return _error(404, ErrorBody(message=str(exc), param="response_id", code="response_not_found"))


async def _bad_request(request: Request, exc: TailorError) -> JSONResponse:
    return _error(400, ErrorBody(message=str(exc)))


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    # the exception's headers too: a 405 lists the allowed methods in Allow, as RFC 9110 requires
    return _error(exc.status_code, ErrorBody(message=f"{request.method} {request.url.path}: {exc.detail}"),
                  exc.headers)


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema, less its 422 answers: a request that fails validation is a 400 with the error body here
    (`_invalid_request`), which each route documents with its other error statuses (routes.errors)."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    schema = FastAPI.openapi(app)  # also kept as app.openapi_schema, so what is removed here stays removed
    for operations in schema["paths"].values():
        for operation in operations.values():
            operation.get("responses", {}).pop("422", None)
    for unused in ("HTTPValidationError", "ValidationError"):
        schema.get("components", {}).get("schemas", {}).pop(unused, None)
    return schema


async def _server_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return _error(500, ErrorBody(message=f"internal error: {exc}", type="server_error"))


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind before uvicorn starts, so a taken port is one clear line, not a traceback after the model loaded.
    Port 0 picks a free port (read it back with `sock.getsockname()[1]`)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    # as uvicorn does: a port left in TIME_WAIT by the last run is free to reuse; one that is listening is not
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise TailorError(f"port {port} on {host} is already in use; pick another with --port") from None
        raise TailorError(f"cannot listen on {host}:{port} ({exc.strerror})") from None
    return sock


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def serve(engine: ServingEngine, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
          config: ServeConfig | None = None, root: Path | str = ".", state_dir: Path | str | None = None,
          watcher=None, registry: Registry | None = None) -> None:
    """Serve until interrupted (Ctrl+C), then close the engine. Without API keys only this machine may connect."""
    app = create_app(engine, config, root, state_dir, watcher, registry)
    if app.state.services.keys is None and host not in LOOPBACK:
        print(f"tailor: no API key configured (serve.api_key_file or --api-key-file), so listening on 127.0.0.1 "
              f"only, not {host}", flush=True)
        host = "127.0.0.1"
    sock = bind_socket(host, port)
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else f"[{host}]" if ":" in host else host
    names = [*engine.model_names(), *app.state.services.aliases.names()]
    auth = "API keys required" if app.state.services.keys is not None else "no API key needed, local only"
    print(f"tailor: chat at http://{shown}:{port}/  (OpenAI API: http://{shown}:{port}/v1, "
          f"models: {', '.join(names)}; {auth}; operations console: http://{shown}:{port}/admin)", flush=True)
    try:
        uvicorn.Server(uvicorn.Config(app, log_level=log_level)).run(sockets=[sock])
    finally:
        engine.close()
