"""Load test of the Serve app on this machine: throughput, latency, batching, autoscaling, a fault.

    python -m jobs.bench.serve [--score-duration-s 15] [--concurrency 1 8 32] [--generator PATH]
    python -m jobs.bench.serve --phases poison overload generator_kill   # the robustness phases only

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
4. ``chat``: ``--chat-concurrency`` clients, each sending a /v1/select request and its
   /v1/chat/completions twin back to back (the instruction as one user message, ``n`` =
   ``num_candidates`` = ``--chat-candidates``, the same ``max_tokens`` and seed: the same candidates when the generator's
   tokenizer has no chat template). Targets: every request 200, chat p50 ≤
   ``--chat-max-latency-ratio`` (1.10) × select p50, and (no chat template) every twin picks the
   same text;
5. ``autoscaling``: Scorer replica counts from ``serve.status()`` sampled every ``--poll-s``
   through all phases, then after the load stops until it is back at ``min_replicas``;
6. ``fault``: ``--fault-concurrency`` clients on /v1/score; once 2 Scorer replicas run, one
   replica's process is killed (SIGKILL). A request the killed replica was serving is lost by
   design (the ingress does not re-send a call whose replica died while serving it: the call may be
   what killed it; Serve itself re-routes a call the dead replica never accepted). Reported:
   requests in flight at the kill and how many were lost (``lost_in_flight``), requests sent after
   the kill and their success fraction, the status/detail of failures. Targets: 2 replicas ran
   before the kill, ≥ 0.99 of the requests sent after the kill succeed, nothing lost before it;
7. ``poison``: each hostile request of issue 14 alone (an oversized decodings list, ``beam999``,
   ``"greedy\n"``, ``topk99999999999999999999``, 60,000 decoding names), then a batch with one bad
   request among good ones, then ``--poison-concurrency`` clients of normal /v1/select traffic.
   Targets: every hostile request answered 4xx (never 5xx), every good one of the batch 200, ≥ 99%
   of the normal requests 200 with a p50 ≤ 1.5 × the ``select`` phase's at that concurrency (or a
   baseline run just before when that phase did not run);
8. ``overload``: ``--overload-concurrency`` /v1/select clients, far more than the Generator admits
   (``--generator-max-ongoing`` per replica + ``--generator-max-queued`` queued); a client that
   gets a 503 waits its ``Retry-After`` (``--no-overload-honor-retry-after``: resends at once);
   statuses counted, latency of the 200s and of the 503s, and who refused: the ingress (it admits
   as many generate requests as the Generator holds and refuses the next one before reading its
   body) or Serve's proxy (the Ingress's own ``--ingress-max-ongoing`` + ``--ingress-max-queued``
   are full).
   Targets: only 200s and 503s, every 503 with ``Retry-After``, 503 p50 ≤ ``--overload-fast-503-ms``,
   and at least one 503 (else the queue was never full and the phase proved nothing);
9. ``generator_kill``: ``--kill-concurrency`` /v1/select clients; after ``--kill-lead-s`` one
   Generator replica's process is SIGKILLed (``--generator-replicas`` 2: the other serves on);
   reported: requests lost (non-200) over the phase and their success fraction, of them those in
   flight at the kill (``lost_in_flight``, lost by design as in ``fault``), time until the
   replica count is back, time until the first success after the kill. Targets as in ``fault``:
   ≥ 99% of the requests sent after the kill succeed, nothing lost before it; and a replacement
   serves.

``--phases`` runs a subset (default: all, in the order above; ``chat``, ``poison``, ``overload``
and ``generator_kill`` need no other phase). Every target of the phases run is checked: the JSON line
has ``targets`` (name → met) and ``failed_targets``; the exit status is 1 when one is missed.

Pairs: validation instructions of a few BIG-Bench tasks with references of the same task as
responses when the BIG-Bench tasks are on this machine, else synthetic text of similar length. Generator:
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


PHASES = ("score", "select", "chat", "autoscaling", "fault", "poison", "overload", "generator_kill")


@dataclass
class ServeBenchConfig:
    phases: list[str] = field(default_factory=lambda: list(PHASES), metadata={
        "choices": PHASES, "help": "phases to run (always in the docstring's order)"})
    concurrency: list[int] = field(default_factory=lambda: [1, 8, 32], metadata={
        "help": "closed-loop /v1/score clients, one phase per value"})
    select_concurrency: list[int] = field(default_factory=lambda: [1, 8, 32], metadata={
        "help": "closed-loop /v1/select clients, one phase per value"})
    score_duration_s: float = field(default=30.0, metadata={
        "help": "length of each /v1/score phase (a 2nd Scorer replica took ~35 s to start on a busy 2-core "
                "machine: shorter load ends before it runs, and scaled_up is missed)"})
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
    fault_concurrency: int = field(default=16, metadata={
        "help": "clients during the fault phase (the most requests in flight at the kill)"})
    fault_duration_s: float = field(default=20.0, metadata={"help": "load after the kill"})
    offline_threads: Optional[int] = field(default=None, metadata={
        "help": "torch threads of the offline reference (default: torch's, i.e. the machine)"})
    generator_replicas: int = field(default=2, metadata={"help": "Generator replicas (2: one survives a kill)"})
    generator_max_ongoing: int = field(default=8, metadata={"help": "Generator max_ongoing_requests per replica"})
    generator_max_queued: int = field(default=32, metadata={
        "help": "Generator max_queued_requests: more waiting calls are refused at once (503 + Retry-After); "
                "Serve counts every call not yet assigned to a replica, so keep it ≥ the largest burst of "
                "the normal phases (select, poison, kill concurrency)"})
    chat_concurrency: int = field(default=2, metadata={
        "help": "clients of the chat phase, each alternating /v1/select and /v1/chat/completions"})
    chat_candidates: int = field(default=4, metadata={
        "help": "candidates per request of the chat phase (few: the routes' own cost weighs more)"})
    chat_duration_s: float = field(default=30.0, metadata={"help": "length of the chat phase"})
    chat_max_latency_ratio: float = field(default=1.10, metadata={
        "help": "target: chat p50 ÷ select p50 for the same candidates"})
    ingress_max_ongoing: int = field(default=56, metadata={
        "help": "Ingress max_ongoing_requests: the Generator's capacity (48) plus room for other routes, "
                "so Serve's proxy refuses the excess (503 + Retry-After) without reaching the ingress"})
    ingress_max_queued: int = field(default=48, metadata={
        "help": "Ingress max_queued_requests (at the proxy); Serve counts a call not yet accepted by a replica "
                "as queued, so keep it ≥ the largest burst of the normal phases (32 /v1/score clients: 8 "
                "refused some of them)"})
    poison_concurrency: int = field(default=8, metadata={"help": "normal /v1/select clients after the hostile ones"})
    poison_duration_s: float = field(default=10.0, metadata={"help": "normal traffic after the hostile requests"})
    overload_concurrency: int = field(default=192, metadata={"help": "/v1/select clients of the overload phase"})
    overload_duration_s: float = field(default=10.0, metadata={"help": "length of the overload phase"})
    overload_honor_retry_after: bool = field(default=True, metadata={
        "help": "a client that got a 503 waits its Retry-After before the next request (as the openai client "
                "does); --no-overload-honor-retry-after: it resends at once"})
    overload_fast_503_ms: float = field(default=1000.0, metadata={
        "help": "target: p50 of the 503s under overload (their p99 is reported)"})
    kill_concurrency: int = field(default=4, metadata={"help": "/v1/select clients of the generator_kill phase"})
    kill_lead_s: float = field(default=5.0, metadata={"help": "load before the Generator replica is killed"})
    kill_duration_s: float = field(default=20.0, metadata={"help": "load after the kill"})
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
        from cappy_core.data.catalog import TaskCatalog

        catalog = TaskCatalog.open()
        out = []
        for task in ("tense", "rephrase", "simple_text_editing", "word_sorting"):
            val = [e for e in catalog.load(task)["validation"] if e.references]
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


def run(cfg: ServeBenchConfig) -> dict:
    import ray
    from ray import serve
    from transformers.utils import logging as hf_logging

    from cappy_core.generation import default_generator_path
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
    phases = set(cfg.phases)
    score_bodies = [{"instruction": i, "responses": rs} for i, rs in reqs]
    select_bodies = [{"instruction": i, "num_candidates": cfg.select_candidates,
                      "max_new_tokens": cfg.select_max_new_tokens} for i, _ in reqs]
    try:
        if "score" in phases:
            score_phase(cfg, url, reqs, score_bodies, poller, marks, result)

        if "select" in phases:
            result["select"] = {}
            for c in cfg.select_concurrency:
                marks.append([poller.now(), f"select c={c}"])
                s = asyncio.run(closed_loop(url + "/v1/select", select_bodies, c, cfg.select_duration_s))
                result["select"][str(c)] = s
                log(f"/v1/select c={c}: {s['req_per_s']} req/s p50 {s['p50_ms']} ms p99 {s['p99_ms']} ms, "
                    f"failures {s['failures']}")
            marks.append([poller.now(), "load stops"])

        if "chat" in phases:
            marks.append([poller.now(), f"chat c={cfg.chat_concurrency}"])
            result["chat"] = chat_phase(cfg, url, [i for i, _ in reqs], has_chat_template(generator))
            ch = result["chat"]
            log(f"chat c={cfg.chat_concurrency}: p50 chat {ch['chat']['p50_ms']} ms vs select "
                f"{ch['select']['p50_ms']} ms (ratio {ch['p50_ratio_chat_vs_select']}); same pick "
                f"{ch['twins_same_pick']}/{ch['twins_answered']}")

        if "poison" in phases:
            marks.append([poller.now(), "poison"])
            result["poison"] = poison_phase(cfg, url, select_bodies, result.get("select", {}))

        if "autoscaling" in phases:
            peak = max((r for _, r, _ in poller.samples), default=0)
            peak_all = max((a for _, _, a in poller.samples), default=0)  # starting ones too: the decision
            down = poller.wait_for(lambda r: r <= cfg.min_replicas, cfg.settle_timeout_s)
            marks.append([poller.now(), f"back to {cfg.min_replicas}" if down is not None else "no scale-down"])
            log(f"autoscaling: peak {peak} running; back to min after {down} s idle")
            result["autoscaling"] = {"min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas,
                                     "peak_running": peak, "peak_replicas_incl_starting": peak_all,
                                     "scale_down_after_idle_s": down}

        if "fault" in phases:
            result["fault"] = fault_phase(cfg, url, score_bodies, poller, marks)

        if "overload" in phases:
            marks.append([poller.now(), f"overload c={cfg.overload_concurrency}"])
            result["overload"] = overload_phase(cfg, url, select_bodies)

        if "generator_kill" in phases:
            marks.append([poller.now(), f"generator_kill c={cfg.kill_concurrency}"])
            result["generator_kill"] = generator_kill_phase(cfg, url, select_bodies, poller, marks)
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


def score_phase(cfg, url, reqs, score_bodies, poller, marks, result) -> None:
    """Offline reference, /v1/score at each concurrency, offline again; figures into ``result``."""
    import torch

    from cappy_core.scorer import Scorer

    if cfg.offline_threads:
        torch.set_num_threads(cfg.offline_threads)
    offline = Scorer.from_pretrained(cfg.scorer, device="cpu")
    result["offline_threads"] = torch.get_num_threads()
    off = [offline_pairs_per_s(offline, reqs)]
    log(f"offline score(): {off[0]:.1f} pairs/s")
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
    top = "32" if "32" in result["score"] else str(max(cfg.concurrency))
    # the faster offline run is the reference: on a shared machine that under-states the ratio
    result["ratio_score32_vs_offline"] = round(result["score"][top]["pairs_per_s"] / max(off), 3)


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


def has_chat_template(generator: str) -> bool:
    """Whether the generator's tokenizer has a chat template (then chat messages reach it templated,
    so /v1/chat/completions and /v1/select do not see the same prompt)."""
    from transformers import AutoTokenizer

    try:
        return bool(getattr(AutoTokenizer.from_pretrained(generator), "chat_template", None))
    except Exception as e:  # noqa: BLE001 - a hub id offline, say: unknown, reported as such
        log(f"chat: could not read the generator's tokenizer ({type(e).__name__}); assuming no chat template")
        return False


def chat_phase(cfg, url, instructions: list[str], chat_template: bool) -> dict:
    """The same instructions, candidates (``num_candidates`` = ``n``, same seed, same decoding plan)
    and scorer through /v1/select and /v1/chat/completions (one user message: the same prompt when
    the generator has no chat template). ``--chat-concurrency`` clients each send a /v1/select and
    its chat twin back to back (alternating which goes first), so both kinds see the same load.
    Reported: p50/p99 of each, chat p50 ÷ select p50, and how many twins picked the same text."""
    import aiohttp

    c, n, m, seed = cfg.chat_concurrency, cfg.chat_candidates, cfg.select_max_new_tokens, cfg.seed
    twins = [({"instruction": i, "num_candidates": n, "max_new_tokens": m, "seed": seed},
              {"model": "cappy", "messages": [{"role": "user", "content": i}], "n": n, "max_tokens": m,
               "seed": seed}) for i in instructions]
    records: list[tuple] = []  # (kind, (client, round), start, end, status, body)

    async def scenario():
        stop_at = time.monotonic() + cfg.chat_duration_s
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=180),
                                         connector=aiohttp.TCPConnector(limit=0)) as session:
            async def client(k: int):
                j = k
                while time.monotonic() < stop_at:
                    select, chat = twins[j % len(twins)]
                    order = [("select", "/v1/select", select), ("chat", "/v1/chat/completions", chat)]
                    for kind, path, body in (order if j % 2 == 0 else order[::-1]):
                        t0 = time.monotonic()
                        status, payload, _ = await post_once(session, url + path, body)
                        records.append((kind, (k, j), t0, time.monotonic(), status, payload))
                    j += c
            await asyncio.gather(*(client(k) for k in range(c)))

    asyncio.run(scenario())
    return chat_summary(records, c, chat_template)


def chat_summary(records: list[tuple], concurrency: int, chat_template: bool) -> dict:
    """Figures of :func:`chat_phase` from its records ``(kind, twin key, start, end, status, body)``."""
    picks: dict[tuple, dict] = {}
    for kind, key, _, _, status, body in records:
        if status == 200 and isinstance(body, dict):
            text = body["response"] if kind == "select" else body["choices"][0]["message"]["content"]
            picks.setdefault(key, {})[kind] = text
    both = [p for p in picks.values() if len(p) == 2]
    out: dict = {"concurrency": concurrency, "chat_template": chat_template}
    for kind in ("select", "chat"):
        rs = [r for r in records if r[0] == kind]
        ok = [(r[2], r[3]) for r in rs if r[4] == 200]
        out[kind] = {"requests": len(rs), "ok": len(ok), "p50_ms": _ms(ok, 0.5), "p99_ms": _ms(ok, 0.99)}
    sel, chat = out["select"]["p50_ms"], out["chat"]["p50_ms"]
    out["p50_ratio_chat_vs_select"] = round(chat / sel, 3) if sel and chat else None
    out["twins_answered"] = len(both)
    out["twins_same_pick"] = sum(1 for p in both if p["select"] == p["chat"])
    return out


# --- robustness phases: poison, overload, generator_kill ----------------------------------------

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


def _ms(rs: list[tuple], q: float) -> float | None:
    x = _pct([r[1] - r[0] for r in rs], q)
    return None if x is None else round(1e3 * x, 1)


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
           "ok_p50_ms": _ms(ok, 0.5), "ok_p99_ms": _ms(ok, 0.99),
           "ok_per_s": round(len(ok) / max(1e-9, max((r[1] for r in records), default=start) - start), 2),
           "503_p50_ms": _ms(busy, 0.5), "503_p99_ms": _ms(busy, 0.99),
           "503_without_retry_after": sum(1 for r in busy if not r[4]),
           "503_by_proxy": len(by_proxy), "503_by_ingress": len(busy) - len(by_proxy),
           "503_by_proxy_p50_ms": _ms(by_proxy, 0.5),
           "503_by_ingress_p50_ms": _ms([r for r in busy if isinstance(r[3], dict)], 0.5),
           "503_details": dict(sorted(details.items(), key=lambda kv: -kv[1])[:3]),
           "other": {k: v for k, v in summarize(records, start)["failures"].items() if not k.startswith("503:")}}
    log(f"overload c={cfg.overload_concurrency}: {statuses}; 200 p50 {out['ok_p50_ms']} ms; "
        f"503 p50 {out['503_p50_ms']} p99 {out['503_p99_ms']} ms")
    return out


def generator_pids(want: int, timeout: float) -> set[int]:
    """pids of the Generator replicas that answer ``info``, asked 8 at a time until ``want`` differ
    or ``timeout`` passed."""
    from ray import serve

    handle = serve.get_deployment_handle("Generator", app_name=APP)
    pids: set[int] = set()
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        for info in [handle.info.remote() for _ in range(8)]:
            try:
                pids.add(info.result(timeout_s=10)["pid"])
            except Exception:  # noqa: BLE001 - a dead or busy replica: ask again
                pass
        if len(pids) >= want:
            break
    return pids


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


def check_targets(result: dict) -> dict[str, bool]:
    """Each target of the phases that ran, name → met."""
    t: dict[str, bool] = {}
    if "ratio_score32_vs_offline" in result:
        t["ratio_score32_vs_offline_ge_0.7"] = result["ratio_score32_vs_offline"] >= 0.7
    if "autoscaling" in result:
        a = result["autoscaling"]
        t["scaled_up"] = a["peak_running"] > a["min_replicas"]
        t["scaled_back_down"] = a["scale_down_after_idle_s"] is not None
    if "fault" in result:  # what it counts: KILL_TARGET_COUNTS
        f = result["fault"]
        t["fault_two_replicas_before_kill"] = f.get("replicas_before", 0) >= 2
        t["fault_sent_after_kill_success_ge_0.99"] = f.get("success_fraction_sent_after_kill", 0) >= 0.99
        t["fault_no_loss_before_kill"] = f.get("lost_before_kill", 1) == 0
    if "chat" in result:
        ch, cfg = result["chat"], result["config"]
        t["chat_all_200"] = all(ch[k]["ok"] == ch[k]["requests"] > 0 for k in ("select", "chat"))
        t["chat_p50_vs_select_le_max_ratio"] = ((ch["p50_ratio_chat_vs_select"] or float("inf"))
                                                <= cfg["chat_max_latency_ratio"])
        if not ch["chat_template"]:  # templated chat prompts differ from the instruction: other candidates
            t["chat_same_pick_as_select"] = ch["twins_answered"] > 0 and ch["twins_same_pick"] == ch["twins_answered"]
    if "poison" in result:
        p = result["poison"]
        t["poison_hostile_all_4xx"] = all(400 <= h["status"] < 500 for h in p["hostile"].values())
        t["poison_mixed_batch_good_200_bad_4xx"] = all(
            (st == 200) if i % 2 == 0 else (400 <= st < 500) for i, st in enumerate(p["mixed_batch_statuses"]))
        t["poison_after_success_ge_0.99"] = p["after_success_fraction"] >= 0.99
        t["poison_after_p50_le_1.5x_select"] = (p["after_p50_vs_baseline"] or float("inf")) <= 1.5
    if "overload" in result:
        o = result["overload"]
        t["overload_only_200_and_503"] = set(o["statuses"]) <= {"200", "503"}
        t["overload_some_503"] = o["statuses"].get("503", 0) > 0
        t["overload_503_all_retry_after"] = o["503_without_retry_after"] == 0
        t["overload_503_p50_fast"] = (o["503_p50_ms"] or 0) <= result["config"]["overload_fast_503_ms"]
        t["overload_some_200"] = o["statuses"].get("200", 0) > 0
    if "generator_kill" in result:  # what it counts: KILL_TARGET_COUNTS, as in fault
        g = result["generator_kill"]
        t["generator_kill_sent_after_kill_success_ge_0.99"] = g.get("success_fraction_sent_after_kill", 0) >= 0.99
        t["generator_kill_no_loss_before_kill"] = g.get("lost_before_kill", 1) == 0
        t["generator_kill_recovered"] = g["recovery_s"] is not None
    return t


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
    result["targets"] = check_targets(result)
    result["failed_targets"] = sorted(k for k, ok in result["targets"].items() if not ok)
    print(json.dumps(result))
    if result["failed_targets"]:
        log(f"targets missed: {', '.join(result['failed_targets'])}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
