"""The two replica-kill phases under load, and what their targets count.

Phase ``fault`` (6 of the docstring's list): ``--fault-concurrency`` clients on /v1/score; once 2
Scorer replicas run, one replica's process is killed (SIGKILL). A request the killed replica was
serving is lost by design (the ingress does not re-send a call whose replica died while serving it:
the call may be what killed it; Serve itself re-routes a call the dead replica never accepted).
Reported: requests in flight at the kill and how many were lost (``lost_in_flight``), requests
sent after the kill and their success fraction, the status/detail of failures. Targets: 2 replicas
ran before the kill, ≥ 0.99 of the requests sent after the kill succeed, nothing lost before it.

Phase ``generator_kill`` (9): ``--kill-concurrency`` /v1/select clients; after ``--kill-lead-s`` one
Generator replica's process is SIGKILLed (``--generator-replicas`` 2: the other serves on);
reported: requests lost (non-200) over the phase and their success fraction, of them those in
flight at the kill (``lost_in_flight``, lost by design as in ``fault``), time until the replica
count is back, time until the first success after the kill. Targets as in ``fault``: ≥ 99% of the
requests sent after the kill succeed, nothing lost before it; and a replacement serves.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

from jobs.bench.serve.client import run_clients, summarize
from jobs.bench.serve.config import log
from jobs.bench.serve.deploy import replica_pids


#: What the replica-kill targets count (also in the phases' JSON).
KILL_TARGET_COUNTS = (
    "success = requests sent after the kill (the router skips the dead replica); a request the killed "
    "replica was serving is lost by design (not re-sent: it may be what killed it), counted in "
    "lost_in_flight, not in the target; any loss before the kill misses fault_no_loss_before_kill")


def kill_split(records: list[tuple], kill_t: float) -> dict:
    """Requests of a replica-kill phase by when they were sent: in flight at the kill (sent before,
    answered after) and sent after it; how many of each failed."""
    in_flight = [r for r in records if r[0] < kill_t <= r[1]]
    sent_after = [r for r in records if r[0] >= kill_t]
    return {"in_flight_at_kill": len(in_flight),
            "lost_in_flight": sum(1 for r in in_flight if r[2] != 200),
            "lost_before_kill": sum(1 for r in records if r[1] < kill_t and r[2] != 200),
            "sent_after_kill": len(sent_after),
            "ok_sent_after_kill": sum(1 for r in sent_after if r[2] == 200),
            "success_fraction_sent_after_kill": round(sum(1 for r in sent_after if r[2] == 200)
                                                      / max(1, len(sent_after)), 4)}


def fault_phase(cfg, url, bodies, poller, marks) -> dict:
    """Load; once 2 Scorer replicas run, SIGKILL one; keep the load on; count what clients saw."""
    out: dict = {"concurrency": cfg.fault_concurrency}

    async def scenario():
        stop_at = [time.monotonic() + cfg.settle_timeout_s + 60]  # bounded even if nothing happens
        clients = asyncio.create_task(run_clients(url + "/v1/score", bodies, cfg.fault_concurrency, stop_at))
        marks.append([poller.now(), f"fault load c={cfg.fault_concurrency}"])
        waited = await asyncio.to_thread(poller.wait_for, lambda r: r >= 2, cfg.settle_timeout_s)
        out["waited_for_2_replicas_s"] = waited
        pids = await asyncio.to_thread(replica_pids, "Scorer", 2 if waited is not None else 1, 30)
        out["replicas_before"] = len(pids)
        kill_t = time.monotonic()
        if pids:
            victim, pid = sorted(pids.items())[0]
            os.kill(pid, signal.SIGKILL)
            out["killed"] = {"replica": victim, "pid": pid, "at_s": poller.now()}
            marks.append([poller.now(), f"SIGKILL scorer replica {victim}"])
            log(f"killed scorer replica {victim} (pid {pid}); {len(pids)} replica(s) were running")
        stop_at[0] = kill_t + cfg.fault_duration_s
        return await clients, kill_t

    records, kill_t = asyncio.run(scenario())
    out.update(kill_split(records, kill_t))
    after = [r for r in records if r[1] >= kill_t]  # answered after the kill (incl. those in flight then)
    s = summarize(after, kill_t)
    out.update(requests_after_kill=s["requests"], ok_after_kill=s["ok"],
               success_fraction=round(s["ok"] / max(1, s["requests"]), 4), p50_ms=s["p50_ms"], p99_ms=s["p99_ms"],
               failures=s["failures"], all_requests=len(records),
               all_ok=sum(1 for r in records if r[2] == 200),
               target_counts=KILL_TARGET_COUNTS)
    log(f"fault: {out['ok_sent_after_kill']}/{out['sent_after_kill']} sent after the kill ok; "
        f"{out['lost_in_flight']} of {out['in_flight_at_kill']} in flight at the kill lost; failures {s['failures']}")
    return out


def generator_pids(want: int, timeout: float) -> set[int]:
    """pids of the Generator replicas that answer ``info`` (see :func:`replica_pids`)."""
    return set(replica_pids("Generator", want, timeout).values())


def generator_kill_phase(cfg, url, bodies, poller, marks) -> dict:
    """/v1/select load; SIGKILL one Generator replica; count lost requests and time the recovery
    (a replica with a new pid answering: the replacement is serving)."""
    out: dict = {"concurrency": cfg.kill_concurrency, "generator_replicas": cfg.generator_replicas}

    async def scenario():
        start = time.monotonic()
        stop_at = [start + cfg.kill_lead_s + cfg.kill_duration_s + 30]  # bounded even if the kill fails
        clients = asyncio.create_task(run_clients(url + "/v1/select", bodies, cfg.kill_concurrency, stop_at))
        await asyncio.sleep(cfg.kill_lead_s)
        before = await asyncio.to_thread(generator_pids, cfg.generator_replicas, 30)
        kill_t = time.monotonic()
        stop_at[0] = kill_t + cfg.kill_duration_s
        recovered = None
        if before:
            victim = min(before)
            os.kill(victim, signal.SIGKILL)
            out["killed_pid"], out["replicas_seen_before"] = victim, len(before)
            marks.append([poller.now(), f"SIGKILL generator pid {victim}"])
            log(f"killed generator replica pid {victim}; {len(before)} replica(s) answered before")
            deadline = kill_t + cfg.settle_timeout_s
            while time.monotonic() < deadline:  # a pid not seen before answers: the replacement serves
                now = await asyncio.to_thread(generator_pids, cfg.generator_replicas, 5)
                if now - before:
                    recovered = round(time.monotonic() - kill_t, 1)
                    break
                await asyncio.sleep(0.5)
        return await clients, start, kill_t, recovered

    records, start, kill_t, recovered = asyncio.run(scenario())
    out.update(kill_split(records, kill_t))
    s = summarize(records, start)
    after = [r for r in records if r[1] >= kill_t]
    first_ok = min((r[1] for r in after if r[2] == 200 and r[0] >= kill_t), default=None)
    out.update(requests=s["requests"], ok=s["ok"], lost=s["requests"] - s["ok"],
               success_fraction=round(s["ok"] / max(1, s["requests"]), 4),
               requests_after_kill=len(after), ok_after_kill=sum(1 for r in after if r[2] == 200),
               recovery_s=recovered,
               first_ok_after_kill_s=None if first_ok is None else round(first_ok - kill_t, 2),
               p50_ms=s["p50_ms"], p99_ms=s["p99_ms"], failures=s["failures"],
               window_s=round(cfg.kill_lead_s + cfg.kill_duration_s, 1), target_counts=KILL_TARGET_COUNTS)
    log(f"generator_kill: {out['lost']} of {out['requests']} lost; replacement serving after {recovered} s")
    return out
