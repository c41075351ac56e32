"""serve_app.metrics: the margin, bounded tag values, recording that never fails (and works in a
plain process without Ray), the refusals of serve_app.errors and serve_app.middleware counted with
their reason, and (slow) the metrics of a Serve deployment scraped from Ray's Prometheus endpoint."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import time

import pytest
from pydantic import BaseModel

from serve_app import metrics


class _Body(BaseModel):
    n: int


class _Fake:
    def __init__(self, calls: list, name: str, fail: bool = False):
        self.calls, self.name, self.fail = calls, name, fail

    def _record(self, value, tags):
        if self.fail:
            raise RuntimeError("exporter down")
        self.calls.append((self.name, value, dict(tags)))

    inc = observe = _record


@pytest.fixture
def recorded(monkeypatch):
    """Fake metric objects in place of Ray's: the list of (metric, value, tags) recorded."""
    calls: list = []
    keys = ("selections", "candidates", "tokens", "generate_s", "score_s", "select_s", "margin", "rejected")
    monkeypatch.setattr(metrics, "_metrics", {k: _Fake(calls, k) for k in keys})
    return calls


def test_score_margin_is_top_minus_second_best():
    assert metrics.score_margin([]) is None and metrics.score_margin([1.5]) is None
    assert metrics.score_margin([0.5, 3.0, 2.0, -1.0]) == pytest.approx(1.0)
    assert metrics.score_margin([2.0, 2.0]) == 0.0
    assert metrics.score_margin([-3.0, -1.25]) == pytest.approx(1.75)


def test_route_tag_is_a_known_route_or_other():
    for route in metrics.ROUTES:
        assert metrics.bounded_route(route) == route
        assert metrics.bounded_route(route + "/") == route
    assert metrics.bounded_route("/cappy/v1/select", root_path="/cappy") == "/v1/select"
    assert metrics.route_of({"path": "/api/healthz", "root_path": "/api"}) == "/healthz"
    assert metrics.route_of({"path": "/v1/models"}) == "/v1/models"
    for raw in ("/v1/select/x", "/V1/SELECT", "/v1/selectx", "/x/v1/select", "/", "", "/v1/score?x=1",
                "/" + "a" * 10_000, "/v1/select/../../etc/passwd"):
        assert metrics.bounded_route(raw) == "other", raw
    assert metrics.bounded_route(None) == "other"  # not even a string: still a tag, not a failure


def test_rejection_reasons_by_status():
    assert [metrics.rejection(s) for s in (400, 422, 401, 404, 413, 503, 429)] == [
        "invalid_request", "invalid_request", "unauthorized", "not_found", "body_too_large", "unavailable",
        "overloaded"]
    assert metrics.rejection(405) == metrics.rejection(500) == metrics.rejection(418) == "other"
    assert {metrics.rejection(s) for s in range(100, 600)} <= metrics.REASONS


def test_record_rejection_bounds_every_tag(recorded):
    metrics.record_rejection("/v1/select", "overloaded", 503)
    metrics.record_rejection("/wp-admin/" + "x" * 500, "because I said so", 4000)
    metrics.record_rejection("/v1/models/", "not_found", 404)
    assert recorded == [
        ("rejected", 1, {"route": "/v1/select", "reason": "overloaded", "status": "503"}),
        ("rejected", 1, {"route": "other", "reason": "other", "status": "other"}),
        ("rejected", 1, {"route": "/v1/models", "reason": "not_found", "status": "404"}),
    ]


def test_record_selection_records_each_metric_and_skips_a_missing_margin(recorded):
    metrics.record_selection("/v1/chat/completions", candidates=4, generated_tokens=57, generate_s=1.5,
                             score_s=0.02, select_s=0.001, margin=0.75)
    route = {"route": "/v1/chat/completions"}
    assert recorded == [("selections", 1, route), ("candidates", 4, route), ("tokens", 57, route),
                        ("generate_s", 1.5, route), ("score_s", 0.02, route), ("select_s", 0.001, route),
                        ("margin", 0.75, route)]
    recorded.clear()
    metrics.record_selection("/nope", candidates=1, generated_tokens=0, generate_s=0.1, score_s=math.nan,
                             select_s=0.0, margin=None)
    other = {"route": "other"}
    assert recorded == [("selections", 1, other), ("candidates", 1, other), ("generate_s", 0.1, other),
                        ("select_s", 0.0, other)]


def test_recording_never_fails_and_logs_once(monkeypatch, caplog):
    calls: list = []
    monkeypatch.setattr(metrics, "_metrics", {"rejected": _Fake(calls, "rejected", fail=True),
                                              "selections": _Fake(calls, "selections", fail=True)})
    monkeypatch.setattr(metrics, "_failed_once", False)
    with caplog.at_level(logging.WARNING, logger=metrics.__name__):
        for _ in range(3):
            metrics.record_rejection("/v1/select", "overloaded", 503)
            metrics.record_selection("/v1/select", candidates=2, generated_tokens=3, generate_s=0.1,
                                     score_s=0.1, select_s=0.1, margin=1.0)
    assert len([r for r in caplog.records if "metrics failed" in r.message]) == 1


_PLAIN = """
import json, sys
import serve_app.metrics as m
made_at_import = m._metrics is not None
m.record_selection("/v1/select", candidates=3, generated_tokens=20, generate_s=0.5, score_s=0.05,
                   select_s=0.001, margin=m.score_margin([0.1, 0.9, 0.4]))
m.record_rejection("/v1/select", "invalid_request", 422)
import ray
print(json.dumps({"made_at_import": made_at_import, "ray_initialized": ray.is_initialized(),
                  "failed": m._failed_once, "types": sorted({type(v).__module__ for v in m._metrics.values()})}))
"""


def test_recording_works_in_a_plain_process_without_ray():
    """Importing makes nothing; recording without Ray makes Ray's Serve metric objects, whose points
    go nowhere, and neither starts Ray nor fails."""
    proc = subprocess.run([sys.executable, "-c", _PLAIN], check=False, capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"made_at_import": False, "ray_initialized": False, "failed": False,
                   "types": ["ray.serve.metrics"]}, (out, proc.stderr)


def test_refusals_are_counted_with_their_reason(monkeypatch):
    """The handlers of serve_app.errors and the refusals of serve_app.middleware each count one
    rejection: 422/400 invalid, 404 unknown path, 413 by Content-Length and by counted chunks (the
    latter through the app's handler), 503 from admission and from a failing deployment."""
    from fastapi import FastAPI, HTTPException
    from fastapi.testclient import TestClient

    from serve_app.auth import ApiKeyAuth, key_sha256
    from serve_app.errors import add_error_handlers
    from serve_app.middleware import BodySizeLimit, GenerateAdmission

    seen: list = []
    monkeypatch.setattr(metrics, "record_rejection", lambda *a: seen.append(a))
    app = FastAPI()
    app.state.max_body_bytes, app.state.generating, app.state.max_generating = 100, 0, -1
    app.state.api_key_sha256 = ()
    app.add_middleware(BodySizeLimit)
    app.add_middleware(GenerateAdmission)
    app.add_middleware(ApiKeyAuth)
    add_error_handlers(app)

    @app.post("/v1/score")
    @app.post("/v1/chat/completions")
    async def echo(body: _Body):
        return {"n": body.n}

    @app.post("/v1/classify")
    async def unavailable():
        raise HTTPException(503, detail="scorer timed out")

    with TestClient(app) as client:
        def expect(status, method="post", path="/v1/score", **kw):
            r = getattr(client, method)(path, **kw)
            assert r.status_code == status, r.text
            return seen.pop() if status >= 400 else None

        assert expect(200, json={"n": 1}) is None and seen == []
        assert expect(422, json={"n": "x"}) == ("/v1/score", "invalid_request", 422)
        assert expect(400, path="/v1/chat/completions", json={}) == ("/v1/chat/completions", "invalid_request", 400)
        assert expect(404, "get", "/etc/passwd") == ("other", "not_found", 404)
        assert expect(413, json={"n": 1, "pad": "x" * 200}) == ("/v1/score", "body_too_large", 413)
        chunks = iter([b'{"n": 1, "pad": "', b"x" * 80, b"x" * 80, b'"}'])
        assert expect(413, content=chunks, headers={"content-type": "application/json"}) == (
            "/v1/score", "body_too_large", 413)
        assert expect(503, path="/v1/classify", json={}) == ("/v1/classify", "unavailable", 503)
        app.state.max_generating = 0
        assert expect(503, path="/v1/chat/completions", json={"n": 1}) == ("/v1/chat/completions", "overloaded", 503)
        app.state.api_key_sha256 = (key_sha256("k1"),)
        assert expect(401, json={"n": 1}) == ("/v1/score", "unauthorized", 401)
        assert expect(401, json={"n": 1}, headers={"Authorization": "Bearer k2"}) == ("/v1/score", "unauthorized", 401)
        assert seen == []


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int) -> str:
    import requests

    try:
        return requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    except requests.RequestException:
        return ""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_metrics_of_a_serve_deployment_reach_rays_prometheus_endpoint(ray_address):
    """A tiny deployment records; the node's metrics agent (running even with the session's
    include_dashboard=False) exports the points, prefixed ``ray_`` and tagged by Serve, within its
    report interval (RAY_metrics_report_interval_ms, 10 s by default)."""
    import ray
    from ray import serve

    app_name = "cappy_metrics_test"
    from jobs.serve import metrics_url

    port = ray._private.worker.global_worker.node.metrics_export_port
    assert port and port == ray.nodes()[0]["MetricsExportPort"], ray.nodes()[0]
    assert metrics_url() == f"http://127.0.0.1:{port}/metrics"  # what `cappy serve` prints

    @serve.deployment(ray_actor_options={"num_cpus": 0.1}, num_replicas=1)
    class Recorder:
        def __call__(self) -> str:
            from serve_app import metrics as m

            m.record_selection("/v1/select", candidates=4, generated_tokens=37, generate_s=0.2, score_s=0.03,
                               select_s=0.001, margin=m.score_margin([1.0, 2.5, 0.1]))
            m.record_rejection("/v1/select", "overloaded", 503)
            m.record_rejection("/v1/../../etc/passwd", "made-up", 999)
            return "ok"

    started = serve.context._get_global_client(raise_if_no_controller_running=False) is None
    if started:
        # not running: start it off the default port 8000, which another Serve on this machine may hold
        serve.start(http_options={"host": "127.0.0.1", "port": _free_port()})
    try:
        handle = serve.run(Recorder.bind(), name=app_name, route_prefix=None)
        assert handle.remote().result(timeout_s=120) == "ok"
        wanted = ("ray_cappy_selections_total", "ray_cappy_candidates_generated_total",
                  "ray_cappy_tokens_generated_total", "ray_cappy_generate_seconds_bucket",
                  "ray_cappy_score_seconds_bucket", "ray_cappy_select_seconds_bucket",
                  "ray_cappy_score_margin_bucket", "ray_cappy_requests_rejected_total")
        ours = f'application="{app_name}"'  # other apps of the session (the cappy_test app) export these too

        def our_lines() -> list[str]:
            return [line for line in _scrape(port).splitlines() if line.startswith("ray_cappy_") and ours in line]

        start = time.monotonic()
        lines = our_lines()
        while not all(any(line.startswith(w + "{") for line in lines) for w in wanted):
            assert time.monotonic() - start < 120, f"after {time.monotonic() - start:.0f} s: {lines}"
            time.sleep(1)
            lines = our_lines()
        print(f"metrics visible {time.monotonic() - start:.1f} s after recording")
        cand = [line for line in lines if line.startswith("ray_cappy_candidates_generated_total{")]
        assert any('route="/v1/select"' in line and 'deployment="Recorder"' in line and 'replica="' in line
                   and line.endswith(" 4.0") for line in cand), cand
        rejected = [line for line in lines if line.startswith("ray_cappy_requests_rejected_total{")]
        assert any('route="/v1/select"' in line and 'reason="overloaded"' in line and 'status="503"' in line
                   for line in rejected), rejected
        assert any('route="other"' in line and 'reason="other"' in line and 'status="other"' in line
                   for line in rejected), rejected
        assert not any("passwd" in line or "made-up" in line or 'status="999"' in line for line in rejected), rejected
        margin = [line for line in lines if line.startswith("ray_cappy_score_margin_bucket{") and 'le="1.5"' in line]
        assert margin and margin[0].endswith(" 1.0"), margin  # 2.5 - 1.0 = 1.5 ≤ 1.5
    finally:
        serve.delete(app_name)
        if started:  # a later module's serve.start must get its own HTTP options
            serve.shutdown()
