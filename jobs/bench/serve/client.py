"""The closed-loop HTTP clients every phase drives (each sends its next request when its last one
answered, until a deadline the caller may move) and the figures of their records: request
rate, latency percentiles, the batch sizes and replicas the answers report, failures by cause."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from typing import Optional

from jobs.bench.serve.config import log


async def post_once(session, url: str, body) -> tuple[int, object, Optional[str]]:
    """``(status, body as JSON or text, Retry-After header)`` of one POST; status 0 = no HTTP answer.
    ``body`` is a dict (sent as JSON) or bytes (sent as they are, as JSON)."""
    try:
        kw = {"json": body} if not isinstance(body, bytes) else {
            "data": body, "headers": {"content-type": "application/json"}}
        async with session.post(url, **kw) as r:
            status, payload, retry_after = r.status, await r.text(), r.headers.get("Retry-After")
        try:
            payload = json.loads(payload)
        except ValueError:
            pass
        return status, payload, retry_after
    except Exception as e:  # noqa: BLE001 - what the client saw
        return 0, f"{type(e).__name__}: {e}", None


async def run_clients(url: str, bodies: list[dict], concurrency: int, stop_at: list[float],
                      timeout_s: float = 180.0, honor_retry_after: bool = False) -> list[tuple]:
    """``concurrency`` closed-loop clients, each sending its next body when the last one answered,
    until ``time.monotonic() >= stop_at[0]`` (a one-item list: the caller may move it). Returns
    ``(start, end, status, body, Retry-After)`` per request; status 0 = no HTTP answer.
    ``honor_retry_after``: after a 503 a client waits ``Retry-After`` seconds before its next
    request, as the openai client does."""
    import aiohttp

    records: list[tuple] = []

    async def client(i: int, session):
        j = i
        while time.monotonic() < stop_at[0]:
            body = bodies[j % len(bodies)]
            j += concurrency
            t0 = time.monotonic()
            status, payload, retry_after = await post_once(session, url, body)
            records.append((t0, time.monotonic(), status, payload, retry_after))
            if honor_retry_after and status == 503 and retry_after and retry_after.isdigit():
                await asyncio.sleep(max(0.0, min(float(retry_after), stop_at[0] - time.monotonic())))

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s),
                                     connector=aiohttp.TCPConnector(limit=0)) as session:
        await asyncio.gather(*(client(i, session) for i in range(concurrency)))
    return records


async def closed_loop(url: str, bodies: list[dict], concurrency: int, duration_s: float) -> dict:
    """:func:`summarize` of ``concurrency`` clients run for ``duration_s``."""
    start = time.monotonic()
    return summarize(await run_clients(url, bodies, concurrency, [start + duration_s]), start)


def percentile(xs: list[float], q: float) -> float | None:
    """The ``q`` quantile of ``xs`` (nearest rank), None when empty."""
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def summarize(records, start: float) -> dict:
    """Figures of :func:`run_clients` records from ``start``: rate and latency of the 200s, the batch
    sizes and replicas their ``meta`` reports, failures counted by status and detail."""
    ok = [r for r in records if r[2] == 200]
    lat = [r[1] - r[0] for r in ok]
    last = max((r[1] for r in records), default=start)
    wall = max(last - start, 1e-9)
    batches = [r[3]["meta"]["batch_requests"] for r in ok if isinstance(r[3], dict) and "meta" in r[3]]
    pairs = [r[3]["meta"]["batch_pairs"] for r in ok if isinstance(r[3], dict) and "meta" in r[3]]
    failures: dict[str, int] = {}
    for r in records:
        if r[2] != 200:
            detail = r[3].get("detail") if isinstance(r[3], dict) else r[3]
            key = f"{r[2]}: {str(detail)[:160]}"
            failures[key] = failures.get(key, 0) + 1
    return {
        "requests": len(records), "ok": len(ok), "wall_s": round(wall, 2),
        "req_per_s": round(len(ok) / wall, 3),
        "p50_ms": None if not lat else round(1e3 * percentile(lat, 0.5), 1),
        "p99_ms": None if not lat else round(1e3 * percentile(lat, 0.99), 1),
        "batch_requests_mean": round(statistics.mean(batches), 2) if batches else None,
        "batch_requests_max": max(batches, default=None),
        "batch_pairs_mean": round(statistics.mean(pairs), 1) if pairs else None,
        "batch_requests_hist": {str(k): batches.count(k) for k in sorted(set(batches))},
        "replicas_answering": len({r[3]["meta"]["replica"] for r in ok if isinstance(r[3], dict) and "meta" in r[3]}),
        "failures": failures,
    }


def latency_ms(rs: list[tuple], q: float) -> float | None:
    """The ``q`` quantile of the records' latencies in ms (0.1 ms), None when there are none."""
    x = percentile([r[1] - r[0] for r in rs], q)
    return None if x is None else round(1e3 * x, 1)


def closed_loop_steps(url: str, route: str, bodies: list[dict], concurrencies: list[int], duration_s: float,
                      poller, marks: list[list], note=lambda s: "") -> dict:
    """:func:`closed_loop` on ``route`` at each concurrency in turn (marked ``<route's name> c=N`` on
    the timeline; then "load stops"), figures by concurrency; ``note(figures)`` may add to them and
    returns words for their log line."""
    name, out = route.rsplit("/", 1)[1], {}
    for c in concurrencies:
        marks.append([poller.now(), f"{name} c={c}"])
        s = asyncio.run(closed_loop(url + route, bodies, c, duration_s))
        words = note(s)
        out[str(c)] = s
        log(f"{route} c={c}: {s['req_per_s']} req/s p50 {s['p50_ms']} ms p99 {s['p99_ms']} ms, "
            f"{words}failures {s['failures']}")
    marks.append([poller.now(), "load stops"])
    return out
