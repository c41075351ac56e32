"""`python -m jobs.bench.chaos`: its killer picks only busy Ray workers below its own process
(fast), and a short chaos run ends with the undisturbed run's output (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from conftest import REPO


def fake(title: str) -> subprocess.Popen:
    """A child whose process title is a Ray worker's."""
    return subprocess.Popen(["bash", "-c", f"exec -a '{title}' sleep 60"])


def busy_after_exec(*procs: subprocess.Popen) -> dict[int, str]:
    """:func:`busy_workers` of this process once exec has set the titles of ``procs``."""
    from jobs.bench.chaos import busy_workers

    for _ in range(100):
        found = busy_workers(os.getpid())
        if all(p.pid in found for p in procs):
            break
        time.sleep(0.02)
    return found


def test_the_killer_only_kills_busy_ray_workers_it_started(tmp_path):
    from jobs.bench.chaos import ChaosConfig, Killer

    busy, idle, agent = (fake("ray::MapWorker(MapBatches(CandidateStage))"), fake("ray::IDLE"),
                         fake("ray::DashboardAgent"))  # the raylet exits with its agents: never a victim
    try:
        found = busy_after_exec(busy)
        assert found == {busy.pid: "ray::MapWorker(MapBatches(CandidateStage))"}  # not idle, not other users'
        killer = Killer(ChaosConfig(kills=3, min_gap_s=0.0, max_gap_s=0.01, seed=1))
        killer.start()
        assert busy.wait(timeout=10) == -9  # SIGKILL
        killer.stop.set()
        killer.join(timeout=10)
        assert [title for _, title, _ in killer.killed] == ["ray::MapWorker(MapBatches(CandidateStage))"]
        assert idle.poll() is None and agent.poll() is None
    finally:
        for p in (busy, idle, agent):
            p.kill()
            p.wait()


def test_target_tasks_kills_only_workers_running_a_sweep_task():
    from cappy_core.config import ConfigError
    from jobs.bench.chaos import ChaosConfig, Killer, run

    with pytest.raises(ConfigError, match="--target tasks .*needs --job sweep"):
        run(ChaosConfig(target="tasks"))
    task, actor = fake("ray::sweep_task"), fake("ray::MapWorker(MapBatches(CandidateStage))")
    try:
        assert set(busy_after_exec(task, actor)) == {task.pid, actor.pid}
        killer = Killer(ChaosConfig(job="sweep", target="tasks", kills=2, min_gap_s=0.0, max_gap_s=0.01, seed=1))
        killer.start()
        assert task.wait(timeout=10) == -9
        time.sleep(0.5)  # dozens more draws: none may hit the Ray Data worker
        killer.stop.set()
        killer.join(timeout=10)
        assert [(title, kind) for _, title, kind in killer.killed] == [("ray::sweep_task", "sweep task")]
        assert killer.pids == [task.pid] and actor.poll() is None
    finally:
        for p in (task, actor):
            p.kill()
            p.wait()


@pytest.mark.slow
def test_a_short_chaos_run_ends_with_the_undisturbed_output(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-m", "jobs.bench.chaos", "--instructions", "8", "--kills", "3",
                           "--min-gap-s", "0.5", "--max-gap-s", "2", "--workdir", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["identical"] and result["rows"] == result["expected_rows"] == 8 * 3
    assert result["duplicate_rows"] == 0 and result["kills"] >= 1
    assert sum(result["killed"].values()) == result["kills"]
