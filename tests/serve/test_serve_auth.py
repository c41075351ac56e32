"""API keys (serve_app/auth.py, ``IngressArgs.api_key_sha256``, ``cappy serve --api-key`` /
``CAPPY_API_KEY``), on a small FastAPI app with the ingress's middleware: no Serve."""

from __future__ import annotations

import hashlib
import json

import pytest
from fastapi import FastAPI
from starlette.testclient import TestClient

from serve_app.args import AppArgs, IngressArgs
from serve_app.auth import key_matches, key_sha256
from serve_app.middleware import add_middleware

KEYS = ["k-first-7f3a", "k-second-91bd"]
DIGESTS = [hashlib.sha256(k.encode()).hexdigest() for k in KEYS]


def make_app(digests=()) -> TestClient:
    app = FastAPI()
    add_middleware(app)
    app.state.api_key_sha256 = tuple(digests)  # what IngressDeployment.__init__ sets

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    @app.post("/v1/score")
    def score(body: dict):
        return {"scores": [0.5]}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": []}

    return TestClient(app)


def assert_refused(resp, *secrets):
    assert resp.status_code == 401
    assert resp.headers["www-authenticate"] == "Bearer"
    err = resp.json()["error"]
    assert set(resp.json()) == {"error"} and err["type"] == "invalid_request_error"
    assert err["code"] == "invalid_api_key" and err["param"] is None and err["message"]
    for s in [*KEYS, *DIGESTS, *secrets]:
        assert s not in resp.text


def test_without_keys_every_route_is_open():
    client = make_app()
    assert client.get("/healthz").status_code == 200
    assert client.post("/v1/score", json={}).status_code == 200
    assert client.get("/v1/models").status_code == 200
    assert client.get("/docs").status_code == 200


@pytest.mark.parametrize("headers", [
    {},
    {"Authorization": "Bearer wrong-key"},
    {"Authorization": f"Bearer {KEYS[0]}x"},
    {"Authorization": f"Basic {KEYS[0]}"},
    {"Authorization": f"{KEYS[0]}"},
    {"Authorization": "Bearer "},
    {"Authorization": f"Bearer {DIGESTS[0]}"},  # the digest is not the key
    {"X-Api-Key": KEYS[0]},
], ids=["none", "wrong", "longer", "basic", "no-scheme", "empty", "digest", "other-header"])
def test_a_missing_or_wrong_key_is_401_in_openais_shape_on_every_route(headers):
    client = make_app(DIGESTS)
    assert_refused(client.post("/v1/score", json={}, headers=headers), "wrong-key")
    assert_refused(client.get("/v1/models", headers=headers))
    assert_refused(client.post("/v1/chat/completions", json={}, headers=headers))  # before routing: no 404
    assert_refused(client.get("/docs", headers=headers))
    assert_refused(client.get("/openapi.json", headers=headers))
    assert_refused(client.post("/healthz", headers=headers))  # only GET/HEAD /healthz is open


def test_any_configured_key_opens_every_route():
    client = make_app(DIGESTS)
    for key in KEYS:
        for scheme in ("Bearer", "bearer"):
            headers = {"Authorization": f"{scheme} {key}"}
            assert client.post("/v1/score", json={}, headers=headers).json() == {"scores": [0.5]}
            assert client.get("/v1/models", headers=headers).status_code == 200
            assert client.get("/openapi.json", headers=headers).status_code == 200


@pytest.mark.parametrize("path", ["/healthz", "/healthz/", "/healthz?deep=false"])
def test_healthz_stays_open(path):
    client = make_app(DIGESTS)
    resp = client.get(path, follow_redirects=True)
    assert resp.status_code == 200 and resp.json() == {"status": "ok"}


def test_the_key_is_checked_before_the_body_size_and_the_generate_admission():
    client = make_app(DIGESTS)
    client.app.state.max_generating = 0  # every generate request would be refused 503
    client.app.state.max_body_bytes = 10
    assert_refused(client.post("/v1/select", json={"instruction": "x" * 100}))
    ok = {"Authorization": f"Bearer {KEYS[1]}"}
    assert client.post("/v1/select", json={}, headers=ok).status_code == 503
    assert client.post("/v1/score", json={"instruction": "x" * 100}, headers=ok).status_code == 413


def test_key_matches_compares_every_digest(monkeypatch):
    import serve_app.auth as auth

    compared = []
    real = auth.hmac.compare_digest
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda a, b: compared.append(b) or real(a, b))
    assert key_matches(KEYS[0], DIGESTS)  # the first matches: the second is compared all the same
    assert compared == [d.encode() for d in DIGESTS]
    assert not key_matches("nope", DIGESTS) and not key_matches(KEYS[0], [])
    assert key_sha256(KEYS[1]) == DIGESTS[1]


def test_ingress_args_hold_digests_only_and_never_echo_a_key():
    args = IngressArgs(api_key_sha256=[d.upper() for d in DIGESTS])
    assert args.api_key_sha256 == DIGESTS and "api_key_sha256" in args.limits()
    assert DIGESTS[0] not in repr(args)
    with pytest.raises(ValueError) as e:
        AppArgs.model_validate({"ingress": {"api_key_sha256": ["raw-secret-key"]}})
    assert "raw-secret-key" not in str(e.value) and "api_key_sha256" in str(e.value)
    with pytest.raises(ValueError) as e:
        AppArgs.model_validate({"ingress": {"api_key_sha256": "raw-secret-key"}})
    assert "raw-secret-key" not in str(e.value)
    assert "sha256sum" in IngressArgs.model_fields["api_key_sha256"].description


# -- cappy serve (jobs/serve.py) ------------------------------------------------------------------

def _resolve(argv, monkeypatch, env_keys=None):
    from jobs.serve import build_parser, resolve

    if env_keys is None:
        monkeypatch.delenv("CAPPY_API_KEY", raising=False)
    else:
        monkeypatch.setenv("CAPPY_API_KEY", env_keys)
    args = build_parser().parse_args(["--dry-run", "--allow-untrained-scorer", *argv])
    return resolve(args)[2]


def test_cappy_serve_hashes_the_flags_and_the_env_vars_keys(monkeypatch):
    assert _resolve([], monkeypatch).ingress.api_key_sha256 == []
    assert _resolve(["--api-key", KEYS[0], "--api-key", KEYS[1]], monkeypatch).ingress.api_key_sha256 == DIGESTS
    assert _resolve([], monkeypatch, env_keys=f" {KEYS[0]},{KEYS[1]} ,").ingress.api_key_sha256 == DIGESTS
    both = _resolve(["--api-key", KEYS[1]], monkeypatch, env_keys=f"{KEYS[0]},{KEYS[1]}")
    assert sorted(both.ingress.api_key_sha256) == sorted(DIGESTS)  # both sources, each key once
    with pytest.raises(ValueError, match="--api-key is empty"):  # never silently keyless
        _resolve(["--api-key", " "], monkeypatch)


def test_cappy_serve_adds_the_flags_keys_to_the_files_digests(monkeypatch, tmp_path):
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("applications:\n  - name: x\n    import_path: serve_app.app:app_builder\n"
                   f"    args: {{ingress: {{api_key_sha256: [{DIGESTS[0]}]}}}}\n")
    got = _resolve(["--serve-config", str(cfg), "--api-key", KEYS[1]], monkeypatch)
    assert got.ingress.api_key_sha256 == DIGESTS


def test_cappy_serve_dry_run_shows_no_key_and_no_digest(monkeypatch, capsys):
    from jobs.serve import main

    monkeypatch.setenv("CAPPY_API_KEY", KEYS[1])
    assert main(["--dry-run", "--allow-untrained-scorer", "--api-key", KEYS[0], "--host", "0.0.0.0"]) == 0
    cap = capsys.readouterr()
    out = json.loads(cap.out)
    assert out["args"]["ingress"]["api_key_sha256"] == ["<2 keys>"]
    for s in [*KEYS, *DIGESTS]:
        assert s not in cap.out + cap.err
    assert "warning" not in cap.err  # keyed: no warning


@pytest.mark.parametrize("host,warns", [
    ("127.0.0.1", False), ("127.3.4.5", False), ("::1", False), ("[::1]", False), ("localhost", False),
    ("0.0.0.0", True), ("::", True), ("10.1.2.3", True), ("my-host.example", True),
])
def test_serving_beyond_loopback_without_a_key_warns(host, warns):
    from jobs.serve import exposure_warning

    msg = exposure_warning(host, keyed=False)
    assert (msg is not None) == warns
    if warns:
        assert msg == (f"warning: serving on {host} without an API key: anyone who can reach it can use it; "
                       "set --api-key or CAPPY_API_KEY")
    assert exposure_warning(host, keyed=True) is None


def test_cappy_serve_warns_on_stderr_without_a_key(monkeypatch, capsys):
    from jobs.serve import main

    monkeypatch.delenv("CAPPY_API_KEY", raising=False)
    assert main(["--dry-run", "--allow-untrained-scorer", "--host", "0.0.0.0"]) == 0
    assert "warning: serving on 0.0.0.0 without an API key" in capsys.readouterr().err


def test_the_example_requests_name_the_env_var_never_a_key():
    from jobs.serve import _examples

    keyed = _examples("http://127.0.0.1:8000", keyed=True)
    lines = [ln for ln in keyed.splitlines() if "curl" in ln]
    assert all('-H "Authorization: Bearer $CAPPY_API_KEY"' in ln for ln in lines if "/healthz" not in ln)
    assert "Authorization" not in _examples("http://127.0.0.1:8000")
