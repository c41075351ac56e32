"""Request-level metrics of the ingress, through Ray Serve's metrics API (:mod:`ray.serve.metrics`).

Ray exports them on each node's Prometheus endpoint (``http://<node>:<metrics_export_port>/metrics``)
with a ``ray_`` prefix, and Serve adds the ``deployment``, ``replica`` and ``application`` tags. The
metric objects are made on first use, in the process that records (a Serve replica): importing this
module creates and registers nothing. Outside Ray (a plain process, a TestClient test) Ray's metric
objects still work and their points go nowhere. Recording never fails a request: an error is logged
once and swallowed.

Tag values are bounded: ``route`` is one of :data:`ROUTES` or ``other``, never the client's path;
``reason`` is one of :data:`REASONS`; ``status`` is the HTTP status. Tests: tests/serve/test_serve_metrics.py.
"""

from __future__ import annotations

import logging
import math
import threading
from typing import Any

logger = logging.getLogger(__name__)

#: The app's routes: the only values of the ``route`` tag besides ``other``.
ROUTES = frozenset({"/v1/select", "/v1/score", "/v1/classify", "/v1/chat/completions", "/v1/completions",
                    "/v1/models", "/healthz"})
#: Why a request was refused: the only values of the ``reason`` tag.
REASONS = frozenset({"invalid_request", "body_too_large", "overloaded", "unavailable", "unauthorized",
                     "not_found", "other"})
_REASON_OF_STATUS = {400: "invalid_request", 422: "invalid_request", 401: "unauthorized", 404: "not_found",
                     413: "body_too_large", 429: "overloaded", 502: "unavailable", 503: "unavailable",
                     504: "unavailable"}

#: Seconds, 1 ms to 60 s.
SECONDS_BOUNDARIES = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0,
                      30.0, 60.0]
#: Selector-value differences (logits), 0..10.
MARGIN_BOUNDARIES = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 7.5, 10.0]

_lock = threading.Lock()
_metrics: dict[str, Any] | None = None
_failed_once = False


def bounded_route(path: str, root_path: str = "") -> str:
    """``path`` (less the app's ``root_path`` and a trailing ``/``) if it is one of :data:`ROUTES`, else ``other``."""
    try:
        if root_path and path.startswith(root_path):
            path = path[len(root_path):]
        path = path.rstrip("/") or "/"
        return path if path in ROUTES else "other"
    except Exception:  # noqa: BLE001 - a tag, never a failure
        return "other"


def route_of(scope) -> str:
    """The bounded ``route`` tag of an ASGI scope."""
    return bounded_route(str(scope.get("path", "")), str(scope.get("root_path", "") or ""))


def rejection(status: int) -> str:
    """The ``reason`` of a refusal with HTTP ``status``: 400/422 ``invalid_request``, 401
    ``unauthorized``, 404 ``not_found``, 413 ``body_too_large``, 429 ``overloaded``, 502-504
    ``unavailable``, anything else ``other``. (The admission middleware's 503 says ``overloaded`` itself.)"""
    return _REASON_OF_STATUS.get(status, "other")


def score_margin(values: list[float]) -> float | None:
    """The best selector value minus the second best; None with fewer than 2 values."""
    if len(values) < 2:
        return None
    top, second = sorted(values, reverse=True)[:2]
    return float(top) - float(second)


def _make() -> dict[str, Any]:
    from ray.serve.metrics import Counter, Histogram

    route = ("route",)

    def seconds(name: str, what: str) -> Histogram:
        return Histogram(name, f"Seconds spent {what} per generate-then-select request.",
                         boundaries=SECONDS_BOUNDARIES, tag_keys=route)

    return {
        "selections": Counter("cappy_selections", "Generate-then-select requests answered.", tag_keys=route),
        "candidates": Counter("cappy_candidates_generated", "Candidates generated for selection.", tag_keys=route),
        "tokens": Counter("cappy_tokens_generated", "Tokens generated in candidates.", tag_keys=route),
        "generate_s": seconds("cappy_generate_seconds", "generating candidates"),
        "score_s": seconds("cappy_score_seconds", "scoring candidates"),
        "select_s": seconds("cappy_select_seconds", "selecting (fusing scores, picking)"),
        "margin": Histogram("cappy_score_margin", "Selector value of the chosen candidate minus the runner-up's.",
                            boundaries=MARGIN_BOUNDARIES, tag_keys=route),
        "rejected": Counter("cappy_requests_rejected", "Requests refused, by route, reason and HTTP status.",
                            tag_keys=("route", "reason", "status")),
    }


def _get() -> dict[str, Any]:
    global _metrics
    if _metrics is None:
        with _lock:
            if _metrics is None:
                _metrics = _make()
    return _metrics


def _failed(what: str, exc: Exception) -> None:
    global _failed_once
    if not _failed_once:
        _failed_once = True
        logger.warning("recording the %s metrics failed; further failures are not logged", what, exc_info=exc)


def _finite(x) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


def record_selection(route: str, *, candidates: int, generated_tokens: int, generate_s: float, score_s: float,
                     select_s: float, margin: float | None) -> None:
    """One generate-then-select request answered: its candidates, generated tokens, seconds per
    stage and the margin between its top two candidates (None: fewer than 2, not observed)."""
    try:
        m = _get()
        route = bounded_route(route)
        m["selections"].inc(1, {"route": route})
        if candidates > 0:
            m["candidates"].inc(int(candidates), {"route": route})
        if generated_tokens > 0:
            m["tokens"].inc(int(generated_tokens), {"route": route})
        for key, value in (("generate_s", generate_s), ("score_s", score_s), ("select_s", select_s)):
            if _finite(value):
                m[key].observe(max(float(value), 0.0), {"route": route})
        if _finite(margin):
            m["margin"].observe(max(float(margin), 0.0), {"route": route})
    except Exception as e:  # noqa: BLE001 - metrics never fail a request
        _failed("selection", e)


def record_rejection(route: str, reason: str, status: int) -> None:
    """One request refused. ``route`` is bounded (:func:`bounded_route`), ``reason`` outside
    :data:`REASONS` is ``other``, a ``status`` outside 100-599 is ``other``."""
    try:
        tags = {"route": bounded_route(route), "reason": reason if reason in REASONS else "other",
                "status": str(status) if isinstance(status, int) and 100 <= status <= 599 else "other"}
        _get()["rejected"].inc(1, tags)
    except Exception as e:  # noqa: BLE001 - metrics never fail a request
        _failed("rejection", e)
