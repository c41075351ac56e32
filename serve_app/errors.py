"""How an error reaches the client: FastAPI's 422 with a one-line ``message`` naming the fields,
``{"detail"}`` for other HTTP errors, and OpenAI's shape on the OpenAI routes, whose clients
parse only that."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve_app import metrics
from serve_app.openai_format import OpenAIError, is_openai_path, openai_http_error, openai_invalid_body


def field_error(field: str, msg: str, kind: str = "value_error") -> RequestValidationError:
    """A 422 for a body field, in FastAPI's own format."""
    return RequestValidationError([{"loc": ("body", field), "msg": msg, "type": kind}])


def add_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)


async def _validation_error(request: Request, exc: RequestValidationError):
    errors = jsonable_encoder(exc.errors(), exclude={"input", "ctx", "url"})
    openai = is_openai_path(request.url.path)
    metrics.record_rejection(metrics.route_of(request.scope), "invalid_request", 400 if openai else 422)
    if openai:
        return openai_invalid_body(errors)
    message = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in errors)
    return JSONResponse({"detail": errors, "message": message}, status_code=422)


async def _http_error(request: Request, exc: StarletteHTTPException):
    metrics.record_rejection(metrics.route_of(request.scope), metrics.rejection(exc.status_code), exc.status_code)
    if isinstance(exc, OpenAIError) or is_openai_path(request.url.path):
        return openai_http_error(exc)
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)
