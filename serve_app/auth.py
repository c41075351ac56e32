"""API keys (as vLLM's ``--api-key``): with any configured, every route but ``GET /healthz`` needs
``Authorization: Bearer <key>``; a request without it, or with a key that is not one of them, is
answered 401 in OpenAI's error shape (``code: invalid_api_key``, header ``WWW-Authenticate:
Bearer``) before its body is read. ``/docs`` and ``/openapi.json`` need the key too.

The app holds only sha256 hex digests of the keys (``app.state.api_key_sha256``, from
``IngressArgs.api_key_sha256``), never the keys: a presented key is hashed and compared with every
digest by :func:`hmac.compare_digest`, all of them whatever matched, so the time taken says
nothing about which digest, or how much of one, a key matched. Nothing here logs a key, a
digest or the ``Authorization`` header, and a 401 names neither.
"""

from __future__ import annotations

import hashlib
import hmac

from serve_app import metrics
from serve_app.openai_format import openai_error

#: What stays open without a key: the liveness probe (GET/HEAD, with or without a trailing slash).
OPEN_PATHS = ("/healthz",)
MISSING = "no API key: send one as the header 'Authorization: Bearer <key>'"
INVALID = "invalid API key"


def key_sha256(key: str) -> str:
    """The hex digest ``IngressArgs.api_key_sha256`` holds for ``key`` (``printf %s KEY | sha256sum``)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def key_matches(key: str, digests: tuple[str, ...] | list[str]) -> bool:
    """Whether ``key`` hashes to one of ``digests``, in time independent of which (every one is compared)."""
    presented = key_sha256(key).encode()
    found = False
    for digest in digests:
        found |= hmac.compare_digest(presented, digest.encode())
    return found


def bearer_token(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The credentials of the first ``Authorization: Bearer <token>`` header, else None."""
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            token = token.strip()
            return token if scheme.lower() == "bearer" and token else None
    return None


def _route(scope) -> str:
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root):  # a route prefix other than "/"
        path = path[len(root):]
    return path.rstrip("/") or "/"


class ApiKeyAuth:
    """ASGI middleware: with ``app.state.api_key_sha256`` non-empty, 401 for a request without a
    valid ``Authorization: Bearer <key>`` (except GET/HEAD ``/healthz``); empty: every request passes."""

    def __init__(self, asgi_app):
        self.app = asgi_app

    async def __call__(self, scope, receive, send):
        digests = getattr(getattr(scope.get("app"), "state", None), "api_key_sha256", ())
        if not digests or scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        if (scope["type"] == "http" and scope.get("method") in ("GET", "HEAD")
                and _route(scope) in OPEN_PATHS):
            return await self.app(scope, receive, send)
        token = bearer_token(scope.get("headers") or [])
        if token is not None and key_matches(token, digests):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":  # refused before the handshake: the server answers 403
            return await send({"type": "websocket.close", "code": 1008})
        metrics.record_rejection(metrics.route_of(scope), "unauthorized", 401)
        resp = openai_error(401, MISSING if token is None else INVALID, "invalid_request_error", None,
                            "invalid_api_key", {"WWW-Authenticate": "Bearer"})
        return await resp(scope, receive, send)
