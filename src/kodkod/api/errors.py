"""Error shapes and the app's exception handlers.

Every error body carries both shapes clients read: OpenAI's `{"error": {message, type, param,
code}}` (the `openai` package, OpenWebUI) and FastAPI's `{"detail": ...}` (TabbyAPI clients,
SillyTavern, which also reads `error.message`). Validation errors keep FastAPI's 422 detail list.
Status codes follow TabbyAPI: 400 bad request / context overflow, 401 keys, 404 unknown
resource, 413 body too large, 422 validation, 429 generation queue full (with Retry-After),
503 no model loaded, 500 anything unhandled (never a traceback).
"""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kodkod.chat import TemplateError
from kodkod.core.backend_types import ModelClosedError
from kodkod.engine.client import RequestError
from kodkod.models.manager import NoModelLoaded
from kodkod.models.params import LoadParamError
from kodkod.models.registry import ModelNameError

log = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_exceeded",
    431: "invalid_request_error",
    500: "server_error",
    501: "not_implemented_error",
    503: "service_unavailable",
}


class ApiError(Exception):
    """An error with a status code and a user-facing message."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers


def error_body(
    status: int, message: str, *, code: str | None = None, param: str | None = None, detail: Any = None
) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": _TYPES.get(status, "error"),
            "param": param,
            "code": code if code is not None else status,
        },
        "detail": message if detail is None else detail,
    }


def error_response(status: int, message: str, **kw: Any) -> JSONResponse:
    return JSONResponse(error_body(status, message, **kw), status_code=status)


def stream_error(message: str, trace: str | None = None) -> dict[str, Any]:
    """The payload of an in-stream error event."""
    return {"error": {"message": message, "trace": trace}}


def _summarise(errors: list[dict[str, Any]]) -> str:
    parts = []
    for e in errors[:5]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        parts.append(f"{loc}: {e.get('msg', 'invalid')}" if loc else str(e.get("msg", "invalid")))
    return "; ".join(parts) or "invalid request"


def _json_safe(value: Any, depth: int = 0) -> Any:
    """The offending `input` a 422 echoes back, made encodable: NaN and ±Infinity as text (JSON
    has no such numbers), lone surrogates replaced (they have no UTF-8 form), and nesting cut
    short, so the 422 answering them never fails to serialise."""
    if depth > 32:
        return "..."
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value.encode("utf-8", "replace").decode("utf-8")
        return value
    if isinstance(value, dict):
        return {_json_safe(k, depth + 1): _json_safe(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v, depth + 1) for v in value]
    return value


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(
            error_body(exc.status, exc.message, code=exc.code, param=exc.param),
            status_code=exc.status,
            headers=exc.headers,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        return JSONResponse(
            error_body(exc.status_code, message), status_code=exc.status_code, headers=exc.headers
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = _json_safe(jsonable_encoder(exc.errors()))
        return JSONResponse(error_body(422, _summarise(errors), detail=errors), status_code=422)

    @app.exception_handler(NoModelLoaded)
    async def _no_model(_: Request, exc: NoModelLoaded) -> JSONResponse:
        return error_response(503, str(exc), code="model_not_loaded")

    @app.exception_handler(ModelClosedError)
    async def _model_closed(_: Request, exc: ModelClosedError) -> JSONResponse:
        return error_response(503, str(exc), code="model_not_loaded")

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, exc: RequestError) -> JSONResponse:
        return error_response(exc.status, exc.message, code=exc.code, param=exc.param)

    @app.exception_handler(TemplateError)
    async def _template_error(_: Request, exc: TemplateError) -> JSONResponse:
        return error_response(400, f"TemplateError: {exc}")

    @app.exception_handler(LoadParamError)
    async def _load_param_error(_: Request, exc: LoadParamError) -> JSONResponse:
        return error_response(400, str(exc))

    @app.exception_handler(ModelNameError)
    async def _model_name_error(_: Request, exc: ModelNameError) -> JSONResponse:
        return error_response(400, str(exc))

    @app.exception_handler(Exception)
    async def _unhandled(_: Request, exc: Exception) -> JSONResponse:
        if isinstance(exc, ValueError) and "null byte" in str(exc):
            # a NUL in a name that reached a path (the OS refuses it): the client's mistake
            return error_response(400, "names must not contain a NUL character")
        log.exception("unhandled error")
        return error_response(500, f"internal server error: {type(exc).__name__}")
