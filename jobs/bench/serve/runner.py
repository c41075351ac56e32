"""One load test: deploy the app, sample its Scorer replica counts throughout, run the chosen
phases in the docstring's order over the same request pairs, and tear everything down; every
figure lands in one dict (the JSON line), the replica counts also in a timeline on stderr."""

from __future__ import annotations

import tempfile
from pathlib import Path

from cappy_core.config import to_dict
from jobs.bench.serve.config import ServeBenchConfig, log
from jobs.bench.serve.deploy import choose_generator, deploy, shutdown
from jobs.bench.serve.payloads import bench_requests
from jobs.bench.serve.phases.autoscaling import autoscaling_phase
from jobs.bench.serve.phases.chat import chat_phase, has_chat_template
from jobs.bench.serve.phases.kills import fault_phase, generator_kill_phase
from jobs.bench.serve.phases.overload import overload_phase
from jobs.bench.serve.phases.poison import poison_phase
from jobs.bench.serve.phases.score import score_phase
from jobs.bench.serve.phases.select import select_phase
from jobs.bench.serve.poller import ReplicaPoller


def run(cfg: ServeBenchConfig) -> dict:
    """The figures of every phase in ``cfg.phases`` (targets not checked yet)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    result: dict = {"bench": "serve", "config": to_dict(cfg)}
    reqs, source = bench_requests(cfg.request_pool, cfg.responses, cfg.seed)
    result["pairs_source"] = source
    tmp = tempfile.TemporaryDirectory(prefix="cappy-bench-serve-")
    generator, note = choose_generator(cfg, Path(tmp.name))
    if note:
        result["generator_note"] = note
    result["generator"] = generator

    url, deploy_s = deploy(cfg, generator)
    result["deploy_s"] = deploy_s
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
            result["select"] = select_phase(cfg, url, select_bodies, poller, marks)

        if "chat" in phases:
            marks.append([poller.now(), f"chat c={cfg.chat_concurrency}"])
            result["chat"] = chat_phase(cfg, url, [i for i, _ in reqs], has_chat_template(generator))

        if "poison" in phases:
            marks.append([poller.now(), "poison"])
            result["poison"] = poison_phase(cfg, url, select_bodies, result.get("select", {}))

        if "autoscaling" in phases:
            result["autoscaling"] = autoscaling_phase(cfg, poller, marks)

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
        shutdown()
        tmp.cleanup()
    return result
