"""ASGI middleware of the ingress: the refusals that must come before a request body is read or
anything is awaited. Their limits live on ``app.state``, which the deployment sets from its args:
Starlette builds middleware from classes, before any replica's args are known."""

from __future__ import annotations

from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse

from serve_app import metrics
from serve_app.args import RETRY_AFTER_S
from serve_app.auth import ApiKeyAuth
from serve_app.openai_format import is_openai_path, openai_error

DEFAULT_MAX_BODY_BYTES = 1_000_000
#: Routes that run the Generator (generate-then-select), admitted by :class:`GenerateAdmission`.
GENERATE_PATHS = ("/v1/select", "/v1/chat/completions", "/v1/completions")


def add_middleware(app: FastAPI) -> None:
    """The three middlewares on ``app``, with their state: the default body limit, no generating
    limit, no API key. Starlette runs the last added first: the key, then admission, then the size."""
    app.state.max_body_bytes = DEFAULT_MAX_BODY_BYTES
    app.state.generating = 0  # requests on GENERATE_PATHS in this replica now
    app.state.max_generating = -1  # IngressArgs.max_generating, set by the deployment
    app.state.api_key_sha256 = ()  # IngressArgs.api_key_sha256, set by the deployment; empty: no key needed
    app.add_middleware(BodySizeLimit)
    app.add_middleware(GenerateAdmission)  # before the body is read
    app.add_middleware(ApiKeyAuth)  # added last: the key is checked before any other refusal


class _BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, detail=f"request body is larger than {limit} bytes")


class BodySizeLimit:
    """ASGI middleware: 413 for a body over ``app.state.max_body_bytes``, by ``Content-Length``
    before anything is read, or by counting the bytes of a chunked body as it arrives."""

    def __init__(self, asgi_app):
        self.app = asgi_app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = getattr(getattr(scope.get("app"), "state", None), "max_body_bytes", DEFAULT_MAX_BODY_BYTES)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            metrics.record_rejection(metrics.route_of(scope), "body_too_large", 413)
            resp = JSONResponse({"detail": f"request body is larger than {limit} bytes"}, status_code=413)
            return await resp(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:  # counted as a rejection by the app's handler (serve_app.errors)
                    raise _BodyTooLarge(limit)
            return message

        return await self.app(scope, counted, send)


class GenerateAdmission:
    """ASGI middleware: at most ``app.state.max_generating`` requests on ``GENERATE_PATHS`` in this
    replica at once (-1: no limit); one more is answered 503 with ``Retry-After`` before its body
    is read or anything is awaited. Under overload a refusal then costs no parsing, no validation
    and no trip through Serve's router to the Generator's full queue, which on a busy replica took
    seconds (the router thread shares the GIL with every admitted request)."""

    def __init__(self, asgi_app):
        self.app = asgi_app

    async def __call__(self, scope, receive, send):
        state = getattr(scope.get("app"), "state", None)
        most = getattr(state, "max_generating", -1)
        if (scope["type"] != "http" or most < 0 or scope.get("method") != "POST"
                or not scope.get("path", "").rstrip("/").endswith(GENERATE_PATHS)):
            return await self.app(scope, receive, send)
        if state.generating >= most:
            message = f"generator is overloaded ({most} requests are being served or queued); retry later"
            headers = {"Retry-After": str(RETRY_AFTER_S)}
            metrics.record_rejection(metrics.route_of(scope), "overloaded", 503)
            if is_openai_path(scope["path"]):
                resp = openai_error(503, message, "server_error", None, "service_unavailable", headers)
            else:
                resp = JSONResponse({"detail": message}, status_code=503, headers=headers)
            return await resp(scope, receive, send)
        state.generating += 1
        try:
            return await self.app(scope, receive, send)
        finally:
            state.generating -= 1
