r"""Phase ``poison`` (7 of the docstring's list): each hostile request of issue 14 alone (an
oversized decodings list, ``beam999``, ``"greedy\n"``, ``topk99999999999999999999``, 60,000
decoding names), then a batch with one bad request among good ones, then ``--poison-concurrency``
clients of normal /v1/select traffic. Targets: every hostile request answered 4xx (never 5xx),
every good one of the batch 200, ≥ 99% of the normal requests 200 with a p50 ≤ 1.5 × the
``select`` phase's at that concurrency (or a baseline run just before when that phase did not run)."""

from __future__ import annotations

import asyncio
import time

from jobs.bench.serve.client import closed_loop, post_once
from jobs.bench.serve.config import log


def hostile_requests(instruction: str, max_new_tokens: int) -> dict[str, dict]:
    """Issue 14's hostile /v1/select bodies, by name: each must be answered 4xx, fast, alone."""
    base = {"instruction": instruction, "max_new_tokens": max_new_tokens}
    return {
        "oversized_decodings": {**base, "decodings": [f"topk{k}" for k in range(1, 18)]},  # ingress limit: 16
        "beam999": {**base, "decodings": ["beam999"]},
        "greedy_newline": {**base, "decodings": ["greedy\n"]},
        "topk_overflow": {**base, "decodings": ["topk99999999999999999999"], "num_samples": 1},
        "decodings_60000": {**base, "decodings": [f"topk{k}" for k in range(60_000)]},  # ~0.7 MB body
    }


def poison_phase(cfg, url, bodies, select_result: dict) -> dict:
    """Hostile requests alone, then one bad request per good ones sent together, then normal traffic
    compared with the select phase at the same concurrency (or a baseline run here first)."""
    import aiohttp

    c = cfg.poison_concurrency
    out: dict = {"concurrency": c}
    baseline = (select_result.get(str(c)) or {}).get("p50_ms")
    if baseline is None:
        out["baseline"] = asyncio.run(closed_loop(url + "/v1/select", bodies, c, cfg.poison_duration_s))
        baseline = out["baseline"]["p50_ms"]
        out["baseline_from"] = "a baseline run in this phase"
    else:
        out["baseline_from"] = f"the select phase at c={c}"
    out["baseline_p50_ms"] = baseline
    hostile = hostile_requests(bodies[0]["instruction"], cfg.select_max_new_tokens)

    async def send_hostile():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=180)) as session:
            alone = {}
            for name, body in hostile.items():
                t0 = time.monotonic()
                status, payload, _ = await post_once(session, url + "/v1/select", body)
                alone[name] = {"status": status, "ms": round(1e3 * (time.monotonic() - t0), 1)}
                if status >= 500 or status < 400:
                    alone[name]["detail"] = str(payload)[:200]
            # a batch: good and bad requests together, so the Generator sees them in one @serve.batch
            mixed = [bodies[0], hostile["beam999"], bodies[1 % len(bodies)], hostile["greedy_newline"],
                     bodies[2 % len(bodies)], hostile["topk_overflow"], bodies[3 % len(bodies)]]
            answers = await asyncio.gather(*(post_once(session, url + "/v1/select", b) for b in mixed))
            return alone, [a[0] for a in answers]

    alone, mixed_statuses = asyncio.run(send_hostile())
    out["hostile"] = alone
    out["mixed_batch_statuses"] = mixed_statuses  # good, bad, good, bad, good, bad, good
    after = asyncio.run(closed_loop(url + "/v1/select", bodies, c, cfg.poison_duration_s))
    out["after"] = after
    out["after_success_fraction"] = round(after["ok"] / max(1, after["requests"]), 4)
    out["after_p50_vs_baseline"] = (round(after["p50_ms"] / baseline, 2) if after["p50_ms"] and baseline else None)
    log(f"poison: hostile {[(k, v['status']) for k, v in alone.items()]}; batch {mixed_statuses}; "
        f"then {after['ok']}/{after['requests']} ok, p50 {after['p50_ms']} ms (baseline {baseline} ms)")
    return out
