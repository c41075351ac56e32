"""Phase ``score`` (2 of the docstring's list, with the ``offline`` reference, 1): ``/v1/score``
with ``--responses`` responses per request at each ``--concurrency``: requests/s, p50/p99 latency,
the scorer batch sizes the responses report (requests and pairs per batch), replicas seen;
:meth:`Scorer.score` on all the request pairs in this process before and after them, the faster
of the two the reference: ``ratio_score32_vs_offline`` = served pairs/s at 32 clients ÷ offline
pairs/s (target ≥ 0.7)."""

from __future__ import annotations

import time

from jobs.bench.serve.client import closed_loop_steps
from jobs.bench.serve.config import log


def offline_pairs_per_s(scorer, reqs) -> float:
    """Pairs/s of one :meth:`Scorer.score` call on every pair of ``reqs``, after a warm-up call."""
    ins = [i for i, rs in reqs for _ in rs]
    res = [r for _, rs in reqs for r in rs]
    scorer.score(ins[:17], res[:17])
    t = time.perf_counter()
    scorer.score(ins, res)
    return len(ins) / (time.perf_counter() - t)


def score_phase(cfg, url, reqs, score_bodies, poller, marks, result) -> None:
    """Offline reference, /v1/score at each concurrency, offline again; figures into ``result``."""
    import torch

    from cappy_core.scorer.model import Scorer

    if cfg.offline_threads:
        torch.set_num_threads(cfg.offline_threads)
    offline = Scorer.from_pretrained(cfg.scorer, device="cpu")
    result["offline_threads"] = torch.get_num_threads()
    off = [offline_pairs_per_s(offline, reqs)]
    log(f"offline score(): {off[0]:.1f} pairs/s")

    def note(s: dict) -> str:
        s["pairs_per_s"] = round(s["req_per_s"] * cfg.responses, 1)
        return f"batch mean {s['batch_requests_mean']} max {s['batch_requests_max']}, "

    result["score"] = closed_loop_steps(url, "/v1/score", score_bodies, cfg.concurrency, cfg.score_duration_s,
                                        poller, marks, note)
    off.append(offline_pairs_per_s(offline, reqs))
    del offline
    log(f"offline score() again: {off[1]:.1f} pairs/s")
    result["offline_pairs_per_s"] = [round(x, 1) for x in off]
    top = "32" if "32" in result["score"] else str(max(cfg.concurrency))
    # the faster offline run is the reference: on a shared machine that under-states the ratio
    result["ratio_score32_vs_offline"] = round(result["score"][top]["pairs_per_s"] / max(off), 3)
