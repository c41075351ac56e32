"""Chaos run: a job on Ray while Ray worker processes are SIGKILLed at random moments.

    python -m jobs.bench.chaos --kills 10 --seed 0             # cappy sample
    python -m jobs.bench.chaos --job sweep --kills 10 --seed 0 # cappy sweep (BIG-Bench tasks on this machine)
    python -m jobs.bench.chaos --job sweep --target tasks --kills 3   # only the sweep's task workers

Starts its own local Ray (``--num-cpus``; never another cluster: ``RAY_ADDRESS`` is ignored)
and a tiny generator (:func:`cappy_core.generation.embedded_model.tiny_generator`) in a temporary folder, runs the job
once undisturbed (after a warm-up sampling run, so both timed runs start alike), then again
into a fresh output while a killer thread, at seeded random moments (``--min-gap-s`` ..
``--max-gap-s`` apart, up to ``--kills`` times), SIGKILLs one worker process of this Ray that
runs a task or holds an actor (title ``ray::<name>``; not an idle worker, not one of the node's
agents, whose death takes the raylet with it; only descendants of this process, so other users'
Ray is never touched), drawn uniformly: the sampler's generator actors and Rouge-L labelling
tasks, Ray Data's helper actors (they outlive each dataset, so they draw many kills) and, with
``--job sweep``, the per-task finetune-and-score tasks. ``--target tasks`` draws only among the
latter (title ``ray::sweep_task``, the Ray task of :func:`jobs.sweep.sweep_task`), which run
in the sweep's last stage only, so that undirected kills rarely hit them. Ray restarts actors and
retries tasks (the sweep's own ``--task-retries`` is at least ``--kills``, so one task may lose
every kill); the sampler commits a shard only when whole (:mod:`cappy_core.generation.shards`).

``--job sample``: ``cappy sample`` on a synthetic task of ``--instructions`` examples (3
candidates each); ``--job sweep``: ``cappy sweep`` on tense and rephrase (3 validation and 3
train instructions each, 17 candidates, the embedded MiniLM scorer finetuned on 16 pairs).
Checks the disturbed run's candidates equal the undisturbed run's row for row, with no duplicate
or missing one (the sweep: also its summary table and every task's numbers), and prints one
JSON line: kills made (by process title and by kind: ``sweep task``, other ``task``, ``actor``),
tasks retried (killed task workers: the output is whole, so Ray ran each again; of the sweep
tasks' kills, those that came after the worker had delivered its result), actor restarts
(from the GCS), the extra wall time, and whether the outputs are identical. Exit status 1 when
they are not.
"""

from __future__ import annotations

import io
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from contextlib import redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from cappy_core.config import ConfigError, build_parser, resolve_and_run, run_main


@dataclass
class ChaosConfig:
    job: str = field(default="sample", metadata={
        "choices": ["sample", "sweep"], "help": "sample: `cappy sample` on a synthetic task; sweep: `cappy sweep` on "
                    "two BIG-Bench tasks (needs them on this machine), the embedded MiniLM scorer, tiny settings"})
    kills: int = field(default=10, metadata={"help": "most worker processes to SIGKILL during the disturbed run"})
    min_gap_s: float = field(default=1.0, metadata={"help": "shortest wait between two kills (s)"})
    max_gap_s: float = field(default=4.0, metadata={"help": "longest wait between two kills (s)"})
    seed: int = field(default=0, metadata={"help": "seeds the kill moments and victims (and sampling)"})
    target: str = field(default="any", metadata={
        "choices": ["any", "tasks"], "help": "any: any busy Ray worker; tasks: only workers running one of the "
                                             "sweep's per-task Ray tasks (ray::sweep_task; --job sweep)"})
    instructions: int = field(default=48, metadata={"help": "synthetic instructions to sample for"})
    shard_size: int = field(default=2, metadata={"help": "instructions per output shard (the unit of commit)"})
    num_actors: int = field(default=2, metadata={"help": "generator actors"})
    num_cpus: int = field(default=2, metadata={"help": "CPUs of the local Ray started for the run"})
    max_new_tokens: int = field(default=8, metadata={"help": "most tokens per candidate"})
    workdir: Optional[str] = field(default=None, metadata={"help": "folder for data and outputs (default: a temp dir)"})


def _descendants(root: int) -> dict[int, str]:
    """``{pid: process title}`` of every live descendant of ``root`` (from /proc)."""
    parent, title = {}, {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            title[int(d.name)] = (d / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue
    out, frontier = {}, [root]
    while frontier:
        p = frontier.pop()
        for child in [c for c, pp in parent.items() if pp == p]:
            out[child] = title[child]
            frontier.append(child)
    return out


#: Ray's own processes that share the ``ray::`` title prefix: the node's agents (the raylet
#: exits with them: that is a lost node, not a lost worker), idle and spill/restore IO workers.
NOT_WORKERS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent", "ray::IDLE", "ray::SPILL_", "ray::RESTORE_",
               "ray::DELETE_")


def busy_workers(root: int) -> dict[int, str]:
    """Ray worker processes under ``root`` that run a task or hold an actor."""
    return {pid: t for pid, t in _descendants(root).items() if t.startswith("ray::") and not t.startswith(NOT_WORKERS)}


def sweep_task_title() -> str:
    """The process title of a worker running one of the sweep's per-task Ray tasks: Ray sets
    ``ray::<task name>``, and jobs/sweep.py names the task after its function."""
    from jobs.sweep import sweep_task

    return f"ray::{sweep_task.__name__}"


class Killer(threading.Thread):
    """SIGKILLs one busy Ray worker (chosen by a seeded draw) after each seeded random gap."""

    def __init__(self, cfg: ChaosConfig):
        super().__init__(daemon=True)
        self.cfg, self.rng, self.stop = cfg, random.Random(cfg.seed), threading.Event()
        self.task_title = sweep_task_title()
        self.killed: list[tuple[float, str, str]] = []  # (seconds in, process title, kind: see kind())
        self.pids: list[int] = []

    def kind(self, pid: int, title: str) -> str:
        return "sweep task" if title == self.task_title else "actor" if _is_actor(pid, title) else "task"

    def run(self) -> None:
        t0 = time.monotonic()
        while len(self.killed) < self.cfg.kills and not self.stop.wait(
                self.rng.uniform(self.cfg.min_gap_s, self.cfg.max_gap_s)):
            victims = busy_workers(os.getpid())
            if self.cfg.target == "tasks":
                victims = {pid: t for pid, t in victims.items() if t == self.task_title}
            if not victims:
                continue
            pid = self.rng.choice(sorted(victims))
            kind = self.kind(pid, victims[pid])
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue  # finished meanwhile
            self.killed.append((round(time.monotonic() - t0, 1), victims[pid], kind))
            self.pids.append(pid)


def _data(root: Path, n: int) -> Path:
    from cappy_core.data.records import Example, split_path, write_examples

    write_examples([Example("chaos", "", "train", i, f"Q: what comes after {i}?\nA:", [f"{i + 1}"])
                    for i in range(n)], split_path(root / "data", "chaos", "train"))
    return root / "data"


def _sample(cfg: ChaosConfig, data: Path, gen: Path, out: Path) -> tuple[float, dict]:
    from cappy_core.generation import SamplingSpec
    from jobs.sample_label import SampleConfig, run as run_sample

    t0 = time.monotonic()
    with redirect_stdout(io.StringIO()):  # the job's own report: this prints one JSON line
        summary = run_sample(SampleConfig(
            tasks=["chaos"], splits=["train"], data=str(data), out=str(out), generator=str(gen), backend="hf",
            sampling=SamplingSpec(decodings=["beam2", "sample"], samples_per_decoding=2, max_new_tokens=cfg.max_new_tokens,
                                  seed=cfg.seed, batch_size=cfg.shard_size, num_actors=cfg.num_actors, cpus_per_actor=0.5),
            shard_size=cfg.shard_size, dtype="float32"))
    return time.monotonic() - t0, summary


SWEEP_TASKS = ("tense", "rephrase")


def _sweep(cfg: ChaosConfig, gen: Path, out: Path) -> float:
    from cappy_core.generation import SamplingSpec
    from cappy_core.scorer.schedule import ScorerSchedule
    from jobs.sweep import SweepConfig, run as run_sweep

    t0 = time.monotonic()
    with redirect_stdout(io.StringIO()):
        run_sweep(SweepConfig(
            tasks=list(SWEEP_TASKS), out=str(out), generator=str(gen), backend="hf", scorer="minilm",
            max_examples_per_task=3, max_train_examples_per_task=3, dev_examples_per_task=1,
            sampling=SamplingSpec(max_new_tokens=cfg.max_new_tokens, cpus_per_actor=0.5, num_actors=cfg.num_actors,
                                  seed=cfg.seed),
            train_size=16, schedule=ScorerSchedule(batch_size=8, micro_batch_size=4, seed=cfg.seed), max_length=64,
            cpus_per_task=0.5, task_retries=max(3, cfg.kills)))  # every kill may land on the same task
    return time.monotonic() - t0


def _sweep_outcome(out: Path) -> tuple:
    """(the sweep's table and every task's numbers, all its candidate rows)."""
    import pyarrow as pa

    from cappy_core.labeling.candidates import read_candidates

    tasks = {}
    for t in SWEEP_TASKS:
        rec = json.loads((out / "tasks" / f"{t}.json").read_text())
        tasks[t] = {k: rec.get(k) for k in ("status", "error", "metrics", "per_instruction", "spearman",
                                            "fused_weights", "dev_metrics", "sizes")}
        tasks[t]["pid"] = rec.get("pid")  # the worker the result came from
    folders = sorted(p for p in out.glob("candidates/sampling-*/*") if p.is_dir())
    return ({"summary.csv": (out / "summary.csv").read_text(), "tasks": tasks},
            pa.concat_tables([read_candidates(f) for f in folders]))


def _actors() -> list:
    """Every actor of the cluster with its pid, class and restarts: Ray's state API (public; it
    is served by the dashboard, which :func:`run` starts for that)."""
    import ray
    from ray.util.state import list_actors

    return list_actors(address=ray.get_runtime_context().gcs_address, detail=True, limit=10_000,
                       raise_on_missing_output=False)


def _actor_restarts() -> int:
    return sum(a.num_restarts or 0 for a in _actors())


def _is_actor(pid: int, title: str) -> bool:
    """Whether the worker ``pid`` (process title ``title``) holds an actor: its pid or its class
    (``ray::Class`` or ``ray::Class.method``) is in the GCS actor table."""
    import ray

    if not ray.is_initialized():
        return False
    name = title.removeprefix("ray::")
    return any(a.pid == pid or (a.class_name and (name == a.class_name or name.startswith(a.class_name + ".")))
               for a in _actors())


def run(cfg: ChaosConfig) -> int:
    import ray

    from cappy_core.labeling.candidates import read_candidates
    from cappy_core.generation.embedded_model import tiny_generator
    from jobs.local_ray import init_local_ray

    if cfg.kills < 0 or cfg.instructions < 1 or cfg.shard_size < 1 or not 0 <= cfg.min_gap_s <= cfg.max_gap_s:
        raise ConfigError("need --kills >= 0, --instructions >= 1, --shard-size >= 1, 0 <= --min-gap-s <= --max-gap-s")
    if cfg.target == "tasks" and cfg.job != "sweep":
        raise ConfigError("--target tasks aims at the sweep's per-task Ray tasks: it needs --job sweep")
    root = Path(cfg.workdir or tempfile.mkdtemp(prefix="cappy-chaos-"))
    gen = tiny_generator(root / "gen")
    data = _data(root, cfg.instructions)
    os.environ.pop("RAY_ADDRESS", None)  # our own cluster: its workers are our descendants
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # loopback only, as the tests run it
    # the dashboard serves the state API that tells actors from tasks (_actors); it listens on
    # loopback and its processes (ray-dashboard-*) are not the killer's targets
    init_local_ray(num_cpus=cfg.num_cpus, include_dashboard=True, log_to_driver=False,
                   object_store_memory=500_000_000)
    if cfg.job == "sweep":
        def job(out: Path) -> float:
            return _sweep(cfg, gen, out)

        def outcome(out: Path):
            return _sweep_outcome(out)
    else:
        def job(out: Path) -> float:
            return _sample(cfg, data, gen, out)[0]

        def outcome(out: Path):
            return None, read_candidates(out)
    try:
        # warm-up (worker start, imports, page cache), so the two timed runs start alike
        _sample(cfg, _data(root / "warm", cfg.shard_size * cfg.num_actors), gen, root / "warm" / "out")
        calm_s = job(root / "undisturbed")
        restarts_before = _actor_restarts()
        killer = Killer(cfg)
        killer.start()
        try:
            chaos_s = job(root / "disturbed")
        finally:
            killer.stop.set()
            killer.join()
        restarts = _actor_restarts() - restarts_before
    finally:
        ray.shutdown()
    (calm_numbers, calm), (chaos_numbers, chaos) = outcome(root / "undisturbed"), outcome(root / "disturbed")
    result_pids = {t.pop("pid") for t in (chaos_numbers or {}).get("tasks", {}).values()}  # not compared
    for t in (calm_numbers or {}).get("tasks", {}).values():
        t.pop("pid")
    keys = Counter(zip(*(chaos[c].to_pylist() for c in ("instruction_id", "decoding", "sample_idx"))))
    identical = calm.equals(chaos) and calm_numbers == chaos_numbers
    expected = cfg.instructions * 3 if cfg.job == "sample" else calm.num_rows
    result = {
        "bench": "chaos", "job": f"cappy {cfg.job}", "rows": chaos.num_rows, "expected_rows": expected,
        "duplicate_rows": sum(n - 1 for n in keys.values()), "kills": len(killer.killed),
        "target": cfg.target, "killed": dict(Counter(title for _, title, _ in killer.killed)),
        "killed_kinds": dict(Counter(kind for *_, kind in killer.killed)),
        "kill_times_s": [t for t, _, _ in killer.killed],
        # every killed task ran again (the output is whole): Ray retried it
        "tasks_retried": sum(kind != "actor" for *_, kind in killer.killed), "actor_restarts": restarts,
        "undisturbed_s": round(calm_s, 1), "disturbed_s": round(chaos_s, 1),
        "extra_min": round((chaos_s - calm_s) / 60, 2), "identical": identical, "seed": cfg.seed,
    }
    if cfg.job == "sweep":
        result["tasks_ok"] = sum(t["status"] == "ok" for t in chaos_numbers["tasks"].values())
        # sweep-task kills that came after the worker had delivered its task's result (a rerun
        # was not needed); every other one was: the task's result came from another worker
        killed_task_pids = {pid for pid, (*_, kind) in zip(killer.pids, killer.killed) if kind == "sweep task"}
        result["sweep_task_kills_after_result"] = len(killed_task_pids & result_pids)
    print(json.dumps(result))
    return 0 if identical and chaos.num_rows == expected else 1


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    parser = build_parser(ChaosConfig, prog=prog or "python -m jobs.bench.chaos", description=__doc__.splitlines()[0])
    args = parser.parse_args(argv)
    return run_main(lambda: resolve_and_run(ChaosConfig, args, None, run))  # --print-config: the YAML, no run


if __name__ == "__main__":
    from jobs.cli import quiet_pipe

    sys.exit(quiet_pipe(main))  # `| head` ends it quietly
