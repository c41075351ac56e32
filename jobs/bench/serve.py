"""Load test of the Serve app on this machine: throughput, latency, batching, autoscaling, a fault.

    python -m jobs.bench.serve [--score-duration-s 15] [--concurrency 1 8 32] [--generator PATH]

Starts its own local Ray (loopback, no dashboard; or joins ``RAY_ADDRESS``) and deploys
``serve_app`` on 127.0.0.1 with a test config (scorer autoscaling 1 → 2 replicas at ½ CPU each,
short delays). Then, with closed-loop HTTP clients (each sends its next request when the last one
answered; all traffic to 127.0.0.1, every loop bounded in time):

1. ``offline``: :meth:`Scorer.score` on all the request pairs in this process (before and after
   the /v1/score phases; the faster of the two is the reference);
2. ``/v1/score`` with ``--responses`` (17) responses per request at each ``--concurrency``:
   requests/s, p50/p99 latency, the scorer batch sizes the responses report (requests and pairs
   per batch), and replicas seen; ``ratio_score32_vs_offline`` = served pairs/s at 32 clients ÷
   offline pairs/s (target ≥ 0.7);
3. ``/v1/select`` (``--select-candidates`` candidates) at each ``--select-concurrency``;
4. ``autoscaling``: Scorer replica counts from ``serve.status()`` sampled every ``--poll-s``
   through all phases, then after the load stops until it is back at ``min_replicas``;
5. ``fault``: ``--fault-concurrency`` clients on /v1/score; once 2 Scorer replicas run, one
   replica's process is killed (SIGKILL); reported: the fraction of requests that succeeded
   (target ≥ 0.99) and the status/detail of the others.

Pairs: validation instructions of a few BIG-Bench tasks with references of the same task as
responses when the BIG-Bench cache is there, else synthetic text of similar length. Generator:
``--generator`` or the embedded one if trained, else a tiny random Llama (throughput only).
Prints ONE JSON line with every figure. Timings on a shared 2-core machine are noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from cappy_core.config import add_dataclass_arguments, config_from_args, to_dict

APP = "cappy_bench"


@dataclass
class ServeBenchConfig:
    concurrency: list[int] = field(default_factory=lambda: [1, 8, 32], metadata={
        "help": "closed-loop /v1/score clients, one phase per value"})
    select_concurrency: list[int] = field(default_factory=lambda: [1, 8, 32], metadata={
        "help": "closed-loop /v1/select clients, one phase per value"})
    score_duration_s: float = field(default=15.0, metadata={"help": "length of each /v1/score phase"})
    select_duration_s: float = field(default=10.0, metadata={"help": "length of each /v1/select phase"})
    responses: int = field(default=17, metadata={"help": "responses per /v1/score request"})
    request_pool: int = field(default=16, metadata={"help": "distinct requests (cycled); also the offline pairs"})
    select_candidates: int = field(default=17, metadata={"help": "num_candidates of /v1/select"})
    select_max_new_tokens: int = field(default=16, metadata={"help": "max_new_tokens of /v1/select"})
    generator: Optional[str] = field(default=None, metadata={
        "help": "generator folder (default: the embedded one if trained, else a tiny random Llama)"})
    generator_backend: str = field(default="auto", metadata={"choices": ["auto", "vllm", "hf"]})
    scorer: str = field(default="minilm", metadata={"help": "scorer of the app and of the offline run"})
    scorer_max_batch_size: int = field(default=16, metadata={"help": "@serve.batch requests per batch"})
    scorer_batch_wait_s: float = field(default=0.01, metadata={"help": "@serve.batch wait"})
    scorer_max_ongoing: int = field(default=64, metadata={"help": "scorer max_ongoing_requests"})
    scorer_num_cpus: float = field(default=0.5, metadata={"help": "CPUs per scorer replica"})
    scorer_threads: int = field(default=1, metadata={"help": "torch threads per scorer replica"})
    min_replicas: int = field(default=1, metadata={"help": "scorer autoscaling min_replicas"})
    max_replicas: int = field(default=2, metadata={"help": "scorer autoscaling max_replicas"})
    target_ongoing: float = field(default=4.0, metadata={"help": "scorer target_ongoing_requests"})
    upscale_delay_s: float = field(default=2.0, metadata={"help": "scorer upscale_delay_s"})
    downscale_delay_s: float = field(default=8.0, metadata={"help": "scorer downscale_delay_s"})
    settle_timeout_s: float = field(default=90.0, metadata={"help": "longest wait for scale-down / scale-up"})
    fault_concurrency: int = field(default=32, metadata={"help": "clients during the fault phase"})
    fault_duration_s: float = field(default=20.0, metadata={"help": "load after the kill"})
    offline_threads: Optional[int] = field(default=None, metadata={
        "help": "torch threads of the offline reference (default: torch's, i.e. the machine)"})
    poll_s: float = field(default=1.0, metadata={"help": "serve.status() sampling period"})
    num_cpus: int = field(default=2, metadata={"help": "CPUs of the local Ray it starts"})
    seed: int = field(default=0)


def log(msg: str) -> None:
    print(f"[bench.serve {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- payloads ---------------------------------------------------------------------------------

def bench_requests(n: int, k: int, seed: int) -> tuple[list[tuple[str, list[str]]], str]:
    """``n`` (instruction, k responses) pairs and where they came from."""
    rng = random.Random(seed)
    try:
        from cappy_core.data.bigbench import load_task
        from cappy_core.data.source import bigbench_task_root

        root = bigbench_task_root()
        out = []
        for task in ("tense", "rephrase", "simple_text_editing", "word_sorting"):
            val = [e for e in load_task(root, task)["validation"] if e.references]
            refs = [r for e in val for r in e.references]
            for e in val[: n // 4 + 1]:
                others = rng.sample(refs, min(k - 1, len(refs)))
                out.append((e.instruction, ([e.references[0]] + others + others * k)[:k]))
        rng.shuffle(out)
        return out[:n], "bigbench validation (tense, rephrase, simple_text_editing, word_sorting)"
    except Exception as e:  # noqa: BLE001 - no cache: synthetic text of similar length
        log(f"BIG-Bench not usable ({type(e).__name__}); synthetic pairs")
    words = "the a of to and in is that for it as with was on be by this are from at or an".split()
    text = lambda m: " ".join(rng.choice(words) for _ in range(m))  # noqa: E731
    return [(f"Q: {text(40)}?\nA:", [text(rng.randint(3, 20)) for _ in range(k)]) for _ in range(n)], "synthetic"


# --- closed-loop clients ----------------------------------------------------------------------

async def run_clients(url: str, bodies: list[dict], concurrency: int, stop_at: list[float],
                      timeout_s: float = 180.0) -> list[tuple]:
    """``concurrency`` closed-loop clients, each sending its next body when the last one answered,
    until ``time.monotonic() >= stop_at[0]`` (a one-item list: the caller may move it). Returns
    ``(start, end, status, body)`` per request; status 0 = no HTTP answer."""
    import aiohttp

    records: list[tuple] = []

    async def client(i: int, session):
        j = i
        while time.monotonic() < stop_at[0]:
            body = bodies[j % len(bodies)]
            j += concurrency
            t0 = time.monotonic()
            try:
                async with session.post(url, json=body) as r:
                    status, payload = r.status, await r.text()
                try:
                    payload = json.loads(payload)
                except ValueError:
                    pass
            except Exception as e:  # noqa: BLE001 - what the client saw
                status, payload = 0, f"{type(e).__name__}: {e}"
            records.append((t0, time.monotonic(), status, payload))

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s),
                                     connector=aiohttp.TCPConnector(limit=0)) as session:
        await asyncio.gather(*(client(i, session) for i in range(concurrency)))
    return records


async def closed_loop(url: str, bodies: list[dict], concurrency: int, duration_s: float) -> dict:
    start = time.monotonic()
    return summarize(await run_clients(url, bodies, concurrency, [start + duration_s]), start)


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def summarize(records, start: float) -> dict:
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
        "p50_ms": None if not lat else round(1e3 * _pct(lat, 0.5), 1),
        "p99_ms": None if not lat else round(1e3 * _pct(lat, 0.99), 1),
        "batch_requests_mean": round(statistics.mean(batches), 2) if batches else None,
        "batch_requests_max": max(batches, default=None),
        "batch_pairs_mean": round(statistics.mean(pairs), 1) if pairs else None,
        "batch_requests_hist": {str(k): batches.count(k) for k in sorted(set(batches))},
        "replicas_answering": len({r[3]["meta"]["replica"] for r in ok if isinstance(r[3], dict) and "meta" in r[3]}),
        "failures": failures,
    }


# --- replica counts ---------------------------------------------------------------------------

class ReplicaPoller:
    """Samples the Scorer's replica states from ``serve.status()`` every ``period`` seconds."""

    def __init__(self, period: float):
        self.period = period
        self.samples: list[tuple[float, int, int]] = []  # (t, running, all)
        self.t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def read(self) -> tuple[int, int]:
        from ray import serve

        dep = serve.status().applications[APP].deployments["Scorer"]
        states = {str(getattr(k, "value", k)): v for k, v in dep.replica_states.items()}
        return states.get("RUNNING", 0), sum(states.values())

    def _run(self):
        while not self._stop.is_set():
            try:
                running, total = self.read()
                self.samples.append((round(time.monotonic() - self.t0, 1), running, total))
            except Exception as e:  # noqa: BLE001 - keep sampling
                log(f"serve.status failed: {e}")
            self._stop.wait(self.period)

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        self._thread.join(timeout=10)

    def now(self) -> float:
        return round(time.monotonic() - self.t0, 1)

    def changes(self) -> list[list]:
        """[t, running, total] at the start and whenever the counts change."""
        out: list[list] = []
        for t, r, a in self.samples:
            if not out or (out[-1][1], out[-1][2]) != (r, a):
                out.append([t, r, a])
        return out

    def wait_for(self, pred, timeout: float) -> float | None:
        """Seconds until ``pred(running)`` holds (checked on fresh reads), or None."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            try:
                if pred(self.read()[0]):
                    return round(time.monotonic() - t0, 1)
            except Exception:  # noqa: BLE001
                pass
            time.sleep(0.5)
        return None


def scorer_pids(want: int, timeout: float) -> dict[str, int]:
    """replica id → pid of Scorer replicas, asking ``info`` through a handle until ``want`` differ."""
    from ray import serve

    handle = serve.get_deployment_handle("Scorer", app_name=APP)
    pids: dict[str, int] = {}
    t0 = time.monotonic()
    while len(pids) < want and time.monotonic() - t0 < timeout:
        for info in [handle.info.remote() for _ in range(8)]:
            try:
                d = info.result(timeout_s=10)
                pids[d["replica"]] = d["pid"]
            except Exception:  # noqa: BLE001
                pass
    return pids


# --- the run ----------------------------------------------------------------------------------

def offline_pairs_per_s(scorer, reqs) -> float:
    ins = [i for i, rs in reqs for _ in rs]
    res = [r for _, rs in reqs for r in rs]
    scorer.score(ins[:17], res[:17])
    t = time.perf_counter()
    scorer.score(ins, res)
    return len(ins) / (time.perf_counter() - t)


def app_args(cfg: ServeBenchConfig, generator: str) -> dict:
    return {
        "generator": {"backend": cfg.generator_backend, "model": generator, "num_cpus": 0.25,
                      "max_new_tokens": cfg.select_max_new_tokens, "max_batch_size": 8, "max_ongoing_requests": 64},
        "scorer": {"model": cfg.scorer, "device": "cpu", "num_cpus": cfg.scorer_num_cpus,
                   "torch_threads": cfg.scorer_threads, "max_batch_size": cfg.scorer_max_batch_size,
                   "batch_wait_timeout_s": cfg.scorer_batch_wait_s, "max_ongoing_requests": cfg.scorer_max_ongoing,
                   "autoscaling_config": {
                       "min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas,
                       "target_ongoing_requests": cfg.target_ongoing, "upscale_delay_s": cfg.upscale_delay_s,
                       "downscale_delay_s": cfg.downscale_delay_s, "metrics_interval_s": 1.0,
                       "look_back_period_s": 3.0}},
        "ingress": {"num_cpus": 0.1, "max_responses": max(64, cfg.responses), "max_candidates": 64,
                    "score_timeout_s": 120, "generate_timeout_s": 120, "retries": 3},
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cfg: ServeBenchConfig) -> dict:
    import ray
    import torch
    from ray import serve
    from transformers.utils import logging as hf_logging

    from cappy_core.generation import default_generator_path
    from cappy_core.scorer import Scorer
    from serve_app.app import app_builder

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    result: dict = {"bench": "serve", "config": to_dict(cfg)}
    reqs, source = bench_requests(cfg.request_pool, cfg.responses, cfg.seed)
    result["pairs_source"] = source
    tmp = tempfile.TemporaryDirectory(prefix="cappy-bench-serve-")
    generator = cfg.generator
    if generator is None:
        generator = str(default_generator_path()) if default_generator_path().is_dir() else None
    if generator is None:
        from cappy_core.lm import tiny_generator

        generator = str(tiny_generator(Path(tmp.name) / "tiny-generator"))
        result["generator_note"] = "tiny random Llama (no embedded generator trained): throughput only"
    result["generator"] = generator

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=False)
    else:
        ray.init(num_cpus=cfg.num_cpus, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 300})
    serve.run(app_builder(app_args(cfg, generator)), name=APP, route_prefix="/", blocking=False)
    result["deploy_s"] = round(time.monotonic() - t0, 1)
    log(f"deployed in {result['deploy_s']} s at {url}")
    poller = ReplicaPoller(cfg.poll_s).start()
    marks: list[list] = []
    try:
        if cfg.offline_threads:
            torch.set_num_threads(cfg.offline_threads)
        offline = Scorer.from_pretrained(cfg.scorer, device="cpu")
        result["offline_threads"] = torch.get_num_threads()
        off = [offline_pairs_per_s(offline, reqs)]
        log(f"offline score(): {off[0]:.1f} pairs/s")

        score_bodies = [{"instruction": i, "responses": rs} for i, rs in reqs]
        result["score"] = {}
        for c in cfg.concurrency:
            marks.append([poller.now(), f"score c={c}"])
            s = asyncio.run(closed_loop(url + "/v1/score", score_bodies, c, cfg.score_duration_s))
            s["pairs_per_s"] = round(s["req_per_s"] * cfg.responses, 1)
            result["score"][str(c)] = s
            log(f"/v1/score c={c}: {s['req_per_s']} req/s p50 {s['p50_ms']} ms p99 {s['p99_ms']} ms, "
                f"batch mean {s['batch_requests_mean']} max {s['batch_requests_max']}, failures {s['failures']}")
        marks.append([poller.now(), "load stops"])
        off.append(offline_pairs_per_s(offline, reqs))
        del offline
        log(f"offline score() again: {off[1]:.1f} pairs/s")
        result["offline_pairs_per_s"] = [round(x, 1) for x in off]
        top = str(max(cfg.concurrency))
        if "32" in result["score"]:
            top = "32"
        # the faster offline run is the reference: on a shared machine that under-states the ratio
        result["ratio_score32_vs_offline"] = round(result["score"][top]["pairs_per_s"] / max(off), 3)

        select_bodies = [{"instruction": i, "num_candidates": cfg.select_candidates,
                          "max_new_tokens": cfg.select_max_new_tokens} for i, _ in reqs]
        result["select"] = {}
        for c in cfg.select_concurrency:
            marks.append([poller.now(), f"select c={c}"])
            s = asyncio.run(closed_loop(url + "/v1/select", select_bodies, c, cfg.select_duration_s))
            result["select"][str(c)] = s
            log(f"/v1/select c={c}: {s['req_per_s']} req/s p50 {s['p50_ms']} ms p99 {s['p99_ms']} ms, "
                f"failures {s['failures']}")
        marks.append([poller.now(), "load stops"])

        peak = max((r for _, r, _ in poller.samples), default=0)
        down = poller.wait_for(lambda r: r <= cfg.min_replicas, cfg.settle_timeout_s)
        marks.append([poller.now(), f"back to {cfg.min_replicas}" if down is not None else "no scale-down"])
        log(f"autoscaling: peak {peak} running; back to min after {down} s idle")
        result["autoscaling"] = {"min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas,
                                 "peak_running": peak, "scale_down_after_idle_s": down}

        result["fault"] = fault_phase(cfg, url, score_bodies, poller, marks)
    finally:
        poller.stop()
        result["replicas_over_time"] = poller.changes()
        result["phase_marks"] = marks
        timeline = sorted([(t, f"scorer replicas running {r} of {a}") for t, r, a in result["replicas_over_time"]]
                          + [(t, f"-- {m}") for t, m in marks])
        log("replica counts over time (s since deploy):\n" + "\n".join(f"  {t:7.1f}  {m}" for t, m in timeline))
        serve.shutdown()
        ray.shutdown()
        tmp.cleanup()
    return result


def fault_phase(cfg, url, bodies, poller, marks) -> dict:
    """Load; once 2 Scorer replicas run, SIGKILL one; keep the load on; count what clients saw."""
    out: dict = {"concurrency": cfg.fault_concurrency}

    async def scenario():
        stop_at = [time.monotonic() + cfg.settle_timeout_s + 60]  # bounded even if nothing happens
        clients = asyncio.create_task(run_clients(url + "/v1/score", bodies, cfg.fault_concurrency, stop_at))
        marks.append([poller.now(), f"fault load c={cfg.fault_concurrency}"])
        waited = await asyncio.to_thread(poller.wait_for, lambda r: r >= 2, cfg.settle_timeout_s)
        out["waited_for_2_replicas_s"] = waited
        pids = await asyncio.to_thread(scorer_pids, 2 if waited is not None else 1, 30)
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
    after = [r for r in records if r[1] >= kill_t]  # answered after the kill (incl. those in flight then)
    s = summarize(after, kill_t)
    out.update(requests_after_kill=s["requests"], ok_after_kill=s["ok"],
               success_fraction=round(s["ok"] / max(1, s["requests"]), 4), p50_ms=s["p50_ms"], p99_ms=s["p99_ms"],
               failures=s["failures"], all_requests=len(records),
               all_ok=sum(1 for r in records if r[2] == 200))
    log(f"fault: {out['ok_after_kill']}/{out['requests_after_kill']} ok after the kill; failures {s['failures']}")
    return out


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog or "python -m jobs.bench.serve",
                                     description=__doc__.splitlines()[0])
    add_dataclass_arguments(parser, ServeBenchConfig)
    cfg = config_from_args(ServeBenchConfig, parser.parse_args(argv))
    stdout, sys.stdout = sys.stdout, sys.stderr  # Ray prints worker/raylet notes to stdout: keep it for the JSON
    try:
        result = run(cfg)
    finally:
        sys.stdout = stdout
    fault, scaling = result.get("fault", {}), result.get("autoscaling", {})
    result["targets"] = {
        "ratio_score32_vs_offline_ge_0.7": result.get("ratio_score32_vs_offline", 0) >= 0.7,
        "fault_success_fraction_ge_0.99": fault.get("success_fraction", 0) >= 0.99,
        "scaled_up": scaling.get("peak_running", 0) > scaling.get("min_replicas", 1),
        "scaled_back_down": scaling.get("scale_down_after_idle_s") is not None,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
