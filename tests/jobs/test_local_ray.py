"""jobs/local_ray.py: a Ray the commands start for themselves listens on loopback only; joining a
cluster is left as it was."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO
from jobs import local_ray

# Starts a local Ray through the helper (a task and an actor, so core workers listen too; with
# SERVE, Serve and a deployment as `cappy serve` does), then lists every LISTEN socket (TCP, IPv4
# and IPv6) of this process and all its descendants: the GCS, raylet, workers, dashboard agent,
# runtime-env agent, log monitor, Serve's controller, proxy and replicas.
CHILD = textwrap.dedent("""
    import json, os, sys, time
    import psutil
    from jobs.local_ray import init_local_ray

    ctx = init_local_ray(serve=SERVE, num_cpus=1, include_dashboard=INCLUDE_DASHBOARD, log_to_driver=False,
                         object_store_memory=100_000_000)
    import ray

    @ray.remote
    def pid():
        return os.getpid()

    @ray.remote
    class Actor:
        def pid(self):
            return os.getpid()

    ray.get([pid.remote(), Actor.remote().pid.remote()])
    if SERVE:
        from ray import serve

        @serve.deployment(ray_actor_options={"num_cpus": 0})
        class Echo:
            def __call__(self, request):
                return "ok"

        serve.start(http_options={"host": "127.0.0.1", "port": PORT})
        serve.run(Echo.bind(), name="echo", route_prefix="/")
    time.sleep(2)  # agents bind their ports while the node starts
    me = psutil.Process()
    found = []
    for p in [me, *me.children(recursive=True)]:
        try:
            conns = p.net_connections(kind="inet")
        except psutil.Error:
            continue
        found += [[p.name(), c.laddr.ip, c.laddr.port] for c in conns if c.status == psutil.CONN_LISTEN]
    print(json.dumps({"node_ip": ctx.address_info["node_ip_address"], "gcs": ctx.address_info["gcs_address"],
                      "listening": found}))
    ray.shutdown()
""")


def _is_loopback(ip: str) -> bool:
    import ipaddress

    addr = ipaddress.ip_address(ip)
    mapped = getattr(addr, "ipv4_mapped", None)  # gRPC's dual-stack socket shows ::ffff:127.0.0.1
    return (mapped or addr).is_loopback


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_child(include_dashboard: bool, serve: bool = False) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", local_ray.SINGLE_NODE_ENV)}
    env.update(RAY_AUTH_MODE="disabled", PYTHONPATH=str(REPO), RAY_USAGE_STATS_ENABLED="0")
    code = (CHILD.replace("INCLUDE_DASHBOARD", str(include_dashboard)).replace("SERVE", str(serve))
            .replace("PORT", str(_free_port())))
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("include_dashboard,serve", [(False, False), (True, False), (False, True)],
                         ids=["plain", "dashboard", "serve"])
def test_a_local_ray_listens_on_loopback_only(include_dashboard, serve):
    out = run_child(include_dashboard, serve)
    names = {name for name, _, _ in out["listening"]}
    assert out["node_ip"] == "127.0.0.1" and out["gcs"].startswith("127.0.0.1:")
    # the servers of a node are all there, so an empty list cannot pass for a good one
    assert {"gcs_server", "raylet"} <= names and any(n.startswith("ray::") for n in names), out
    gcs_port = int(out["gcs"].rsplit(":", 1)[1])
    assert any(name == "gcs_server" and port == gcs_port for name, _, port in out["listening"])
    if serve:  # each replica's inter-deployment gRPC server, which Serve binds to [::] itself
        assert any(n.startswith("ray::ServeReplica") for n in names), out
    beyond = [s for s in out["listening"] if not _is_loopback(s[1])]
    assert beyond == [], f"listening beyond loopback: {beyond}"


def test_joining_a_cluster_is_plain_ray_init_without_the_local_options(monkeypatch):
    import ray

    calls = []
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.delenv(local_ray.SINGLE_NODE_ENV, raising=False)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    local_ray.init_local_ray(num_cpus=4, include_dashboard=False, object_store_memory=10**8, log_to_driver=False)
    assert calls == [{"log_to_driver": False}]
    assert local_ray.SINGLE_NODE_ENV not in os.environ  # a remote cluster: nothing switched

    monkeypatch.delenv("RAY_ADDRESS")
    local_ray.init_local_ray(address="auto", num_cpus=4)
    assert calls[-1] == {"address": "auto"}


def test_starting_a_local_ray_turns_on_rays_single_node_mode_first(monkeypatch):
    import ray
    from ray._private import ray_constants, services

    seen = []

    def fake_init(**kw):  # what ray.init would make of a loopback node IP at this point
        seen.append((kw, os.environ.get(local_ray.SINGLE_NODE_ENV), services.resolve_ip_for_localhost("127.0.0.1")))

    monkeypatch.setattr(ray, "init", fake_init)
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", True)  # as on Linux; restored afterwards
    monkeypatch.delenv(local_ray.SINGLE_NODE_ENV, raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    local_ray.init_local_ray(num_cpus=1, include_dashboard=False)
    assert seen == [({"num_cpus": 1, "include_dashboard": False}, "0", "127.0.0.1")]
    assert ray_constants.ENABLE_RAY_CLUSTER is False

    seen.clear()
    local_ray.init_local_ray(address="local", num_cpus=1)  # "local": a new Ray even with RAY_ADDRESS
    assert seen[0][0] == {"address": "local", "num_cpus": 1}


def test_every_command_starts_ray_through_the_helper():
    """No other ``ray.init`` in the commands: each would start a Ray listening on every interface."""
    offenders = []
    for path in (REPO / "jobs").rglob("*.py"):
        if path.name == "local_ray.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if "ray.init(" in code and "init_local_ray" not in code and not code.lstrip().startswith(('"', "'")):
                offenders.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert offenders == []


def test_serve_replicas_grpc_server_is_bound_to_loopback_by_the_setup_hook(monkeypatch):
    """``ray.serve._private.replica`` binds its inter-deployment gRPC server to ``[::]:0`` itself;
    the worker setup hook of a local Ray that runs Serve makes that ``127.0.0.1:0``."""
    import ray
    from ray.serve._private import replica

    bound = []
    monkeypatch.setattr(replica, "add_port_to_grpc_server", lambda server, address: bound.append(address) or 1)
    local_ray.serve_grpc_on_loopback()
    local_ray.serve_grpc_on_loopback()  # once per process is what counts: not wrapped twice
    replica.add_port_to_grpc_server(None, "[::]:0")
    replica.add_port_to_grpc_server(None, "10.0.0.1:9000")
    assert bound == ["127.0.0.1:0", "10.0.0.1:9000"]

    calls = []
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.setattr(local_ray, "use_loopback", lambda: None)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    local_ray.init_local_ray(serve=True, num_cpus=1, runtime_env={"env_vars": {"A": "1"}})
    assert calls[-1]["runtime_env"] == {"env_vars": {"A": "1"},
                                        "worker_process_setup_hook": "jobs.local_ray.serve_grpc_on_loopback"}
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    local_ray.init_local_ray(serve=True)  # a cluster's own Ray is its operator's: no hook
    assert calls[-1] == {}
