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


def test_the_killer_only_kills_busy_ray_workers_it_started(tmp_path):
    from jobs.bench.chaos import ChaosConfig, Killer, busy_workers

    def fake(title: str) -> subprocess.Popen:  # a child whose process title is a Ray worker's
        return subprocess.Popen(["bash", "-c", f"exec -a '{title}' sleep 60"])

    busy, idle, agent = (fake("ray::MapWorker(MapBatches(CandidateStage))"), fake("ray::IDLE"),
                         fake("ray::DashboardAgent"))  # the raylet exits with its agents: never a victim
    try:
        for _ in range(100):  # until exec has set the titles
            found = busy_workers(os.getpid())
            if busy.pid in found:
                break
            time.sleep(0.02)
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
