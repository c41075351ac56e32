"""The app under test: which generator it serves, its test config (small, fast-scaling replicas),
starting Ray and Serve on loopback and deploying it, tearing both down, and the pids of the
replicas (asked through a handle: the kill phases SIGKILL one)."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from jobs.bench.serve.config import APP, ServeBenchConfig, log


def choose_generator(cfg: ServeBenchConfig, tmp: Path) -> tuple[str, str | None]:
    """``--generator``, else the embedded one if trained, else a tiny random Llama written under
    ``tmp``; and a note for the JSON when it is the latter (its figures are throughput only)."""
    from cappy_core.generation import default_generator_path

    generator = cfg.generator
    if generator is None:
        generator = str(default_generator_path()) if default_generator_path().is_dir() else None
    if generator is None:
        from cappy_core.generation.embedded_model import tiny_generator

        return (str(tiny_generator(tmp / "tiny-generator")),
                "tiny random Llama (no embedded generator trained): throughput only")
    return generator, None


def app_args(cfg: ServeBenchConfig, generator: str) -> dict:
    """``serve_app``'s builder args for the test: Scorer autoscaling within the flags' bounds with
    short delays, the Generator's and the Ingress's admission limits from the flags."""
    return {
        "generator": {"backend": cfg.generator_backend, "model": generator, "num_cpus": 0.25,
                      "num_replicas": cfg.generator_replicas, "max_new_tokens": cfg.select_max_new_tokens,
                      "max_batch_size": 8, "max_ongoing_requests": cfg.generator_max_ongoing,
                      "max_queued_requests": cfg.generator_max_queued},
        "scorer": {"model": cfg.scorer, "device": "cpu", "num_cpus": cfg.scorer_num_cpus,
                   "torch_threads": cfg.scorer_threads, "max_batch_size": cfg.scorer_max_batch_size,
                   "batch_wait_timeout_s": cfg.scorer_batch_wait_s, "max_ongoing_requests": cfg.scorer_max_ongoing,
                   "autoscaling_config": {
                       "min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas,
                       "target_ongoing_requests": cfg.target_ongoing, "upscale_delay_s": cfg.upscale_delay_s,
                       "downscale_delay_s": cfg.downscale_delay_s, "metrics_interval_s": 1.0,
                       "look_back_period_s": 3.0}},
        "ingress": {"num_cpus": 0.1, "max_ongoing_requests": cfg.ingress_max_ongoing,
                    "max_queued_requests": cfg.ingress_max_queued, "max_responses": max(64, cfg.responses),
                    "max_candidates": 64,
                    "score_timeout_s": 120, "generate_timeout_s": 120, "retries": 3},
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deploy(cfg: ServeBenchConfig, generator: str) -> tuple[str, float]:
    """Start (or join ``RAY_ADDRESS``) Ray and Serve on 127.0.0.1 and deploy the app; its URL and
    the seconds Serve took to deploy it."""
    from ray import serve

    from jobs.local_ray import init_local_ray
    from serve_app.app import app_builder

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    init_local_ray(serve=True, num_cpus=cfg.num_cpus, include_dashboard=False, log_to_driver=False)  # or join RAY_ADDRESS
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 300})
    serve.run(app_builder(app_args(cfg, generator)), name=APP, route_prefix="/", blocking=False)
    deploy_s = round(time.monotonic() - t0, 1)
    log(f"deployed in {deploy_s} s at {url}")
    return url, deploy_s


def shutdown() -> None:
    """Serve, then Ray."""
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


def replica_pids(deployment: str, want: int, timeout: float) -> dict:
    """replica id (the pid where ``info`` names none) → pid of the ``deployment``'s replicas, asking
    ``info`` through a handle, 8 calls at a time, until ``want`` differ or ``timeout`` passed."""
    from ray import serve

    handle = serve.get_deployment_handle(deployment, app_name=APP)
    pids: dict = {}
    t0 = time.monotonic()
    while len(pids) < want and time.monotonic() - t0 < timeout:
        for info in [handle.info.remote() for _ in range(8)]:
            try:
                d = info.result(timeout_s=10)
                pids[d.get("replica", d["pid"])] = d["pid"]
            except Exception:  # noqa: BLE001 - a dead or busy replica: ask again
                pass
    return pids
