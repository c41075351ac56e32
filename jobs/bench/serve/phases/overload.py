"""Phase ``overload`` (8 of the docstring's list): ``--overload-concurrency`` /v1/select clients,
far more than the Generator admits (``--generator-max-ongoing`` per replica +
``--generator-max-queued`` queued); a client that gets a 503 waits its ``Retry-After``
(``--no-overload-honor-retry-after``: resends at once); statuses counted, latency of the 200s and
of the 503s, and who refused: the ingress (it admits as many generate requests as the Generator
holds and refuses the next one before reading its body) or Serve's proxy (the Ingress's own
``--ingress-max-ongoing`` + ``--ingress-max-queued`` are full). Targets: only 200s and 503s, every
503 with ``Retry-After``, 503 p50 ≤ ``--overload-fast-503-ms``, and at least one 503 (else the
queue was never full and the phase proved nothing)."""

from __future__ import annotations

import asyncio
import time

from jobs.bench.serve.client import latency_ms, run_clients, summarize
from jobs.bench.serve.config import log


def overload_phase(cfg, url, bodies) -> dict:
    """Far more /v1/select clients than the Generator admits; what each kind of answer looked like."""
    start = time.monotonic()
    records = asyncio.run(run_clients(url + "/v1/select", bodies, cfg.overload_concurrency,
                                      [start + cfg.overload_duration_s],
                                      honor_retry_after=cfg.overload_honor_retry_after))
    ok = [r for r in records if r[2] == 200]
    busy = [r for r in records if r[2] == 503]
    statuses: dict[str, int] = {}
    for r in records:
        statuses[str(r[2])] = statuses.get(str(r[2]), 0) + 1
    details: dict[str, int] = {}
    for r in busy:
        d = str(r[3].get("detail") if isinstance(r[3], dict) else r[3])[:120]
        d = d.split(" (num_queued_requests=")[0]  # Serve's proxy: one key, whatever the count
        details[d] = details.get(d, 0) + 1
    by_proxy = [r for r in busy if not isinstance(r[3], dict)]  # Serve's refusal is plain text
    out = {"concurrency": cfg.overload_concurrency,
           "generator_admits": cfg.generator_replicas * cfg.generator_max_ongoing + cfg.generator_max_queued,
           "requests": len(records), "statuses": statuses,
           "ok_p50_ms": latency_ms(ok, 0.5), "ok_p99_ms": latency_ms(ok, 0.99),
           "ok_per_s": round(len(ok) / max(1e-9, max((r[1] for r in records), default=start) - start), 2),
           "503_p50_ms": latency_ms(busy, 0.5), "503_p99_ms": latency_ms(busy, 0.99),
           "503_without_retry_after": sum(1 for r in busy if not r[4]),
           "503_by_proxy": len(by_proxy), "503_by_ingress": len(busy) - len(by_proxy),
           "503_by_proxy_p50_ms": latency_ms(by_proxy, 0.5),
           "503_by_ingress_p50_ms": latency_ms([r for r in busy if isinstance(r[3], dict)], 0.5),
           "503_details": dict(sorted(details.items(), key=lambda kv: -kv[1])[:3]),
           "other": {k: v for k, v in summarize(records, start)["failures"].items() if not k.startswith("503:")}}
    log(f"overload c={cfg.overload_concurrency}: {statuses}; 200 p50 {out['ok_p50_ms']} ms; "
        f"503 p50 {out['503_p50_ms']} p99 {out['503_p99_ms']} ms")
    return out
