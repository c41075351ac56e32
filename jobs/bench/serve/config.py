"""The load test's settings (one flag each), the app's name, the phases in their order, and the
log line every part of the run writes to stderr (stdout holds only the JSON line)."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Optional

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
    chat_stream: bool = field(default=True, metadata={
        "help": "the chat phase also sends each chat request with stream=true (time to first content chunk); "
                "--no-chat-stream: plain chat only"})
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
