"""The web application: the OpenAI-compatible API under /v1, a health check, and the chat page at /.

Every error leaves in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, so OpenAI clients show the
message instead of failing to parse it; a bad request is a 4xx naming the field, never a 500.
"""

from __future__ import annotations

import errno
import logging
import socket
from importlib import resources

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException

from tailor.errors import TailorError
from tailor.serve.engine import Engine, PromptTooLongError, UnknownModelError
from tailor.serve.openai.protocol import ErrorBody, ErrorResponse
from tailor.serve.openai.routes import router

log = logging.getLogger(__name__)


def create_app(engine: Engine) -> FastAPI:
    # no /docs: Swagger UI loads its scripts from a CDN, and the server must work offline
    app = FastAPI(title="tailor", docs_url=None, redoc_url=None)
    app.state.engine = engine
    app.include_router(router)
    chat_page = resources.files("tailor.serve").joinpath("web/index.html").read_text(encoding="utf-8")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "models": engine.model_names()}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def chat() -> str:
        return chat_page

    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(UnknownModelError, _unknown_model)
    app.add_exception_handler(PromptTooLongError, _prompt_too_long)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _server_error)
    return app


def _error(status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
           code: str | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorBody(message=message, type=type, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status)


def _field(loc: tuple) -> str:
    """("body", "messages", 0, "role") -> "messages[0].role"."""
    name = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        name += f"[{part}]" if isinstance(part, int) else f".{part}" if name else str(part)
    return name or "body"


async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = exc.errors()
    if problems and problems[0]["type"] == "json_invalid":
        detail = problems[0].get("ctx", {}).get("error", "")
        return _error(400, f"the request body is not valid JSON ({detail})", code="invalid_json")
    if problems and problems[0]["loc"] == ("body",):
        return _error(400, "the request body must be a JSON object (Content-Type: application/json)",
                      code="invalid_json")
    fields = [_field(p["loc"]) for p in problems]
    message = "; ".join(f"{field}: {p['msg']}" for field, p in zip(fields, problems))
    return _error(400, message, param=fields[0] if fields else None, code="invalid_value")


async def _unknown_model(request: Request, exc: UnknownModelError) -> JSONResponse:
    return _error(404, str(exc), param="model", code="model_not_found")


async def _prompt_too_long(request: Request, exc: PromptTooLongError) -> JSONResponse:
    return _error(400, str(exc), param="messages", code="context_length_exceeded")


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    return _error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")


async def _server_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return _error(500, f"internal error: {exc}", type="server_error")


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


def serve(engine: Engine, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve until interrupted (Ctrl+C)."""
    sock = bind_socket(host, port)
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else f"[{host}]" if ":" in host else host
    print(f"tailor: chat at http://{shown}:{port}/  (OpenAI API: http://{shown}:{port}/v1, "
          f"models: {', '.join(engine.model_names())})", flush=True)
    uvicorn.Server(uvicorn.Config(create_app(engine), log_level=log_level)).run(sockets=[sock])
