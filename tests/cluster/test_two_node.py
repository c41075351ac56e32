"""A real two-node Ray cluster on this machine (``cluster/local_two_node.py``): ``cappy sweep``
submitted through the Jobs API with the repository as working_dir must succeed, its two tasks
must have run one on each node, and the results must be in the shared folder.

The script runs as a subprocess in its own session: it never touches the session's Ray
(``ray_address``), uses its own ports and temp dir, and, where it can, a network namespace whose
only interface is loopback. Whatever happens, the test kills the subprocess's process group and
checks that nothing of the run is left."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow

SCRIPT = REPO / "cluster" / "local_two_node.py"
TASKS = ["standin_tense", "standin_rephrase"]  # stand-in tasks (tests/fake_release.py)


def _group(pgid: int) -> list[int]:
    import psutil

    pids = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid:
                pids.append(p.pid)
        except (OSError, psutil.Error):
            pass
    return pids


def _kill_group(pgid: int) -> None:
    """SIGTERM, then SIGKILL, the process group the test started (by its id)."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 5)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while _group(pgid) and time.monotonic() < deadline:
            time.sleep(0.5)


def _left_over(*markers) -> list[str]:
    import psutil

    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if any(str(m) in cmd for m in markers):
            found.append(f"{p.info['pid']}: {cmd[:200]}")
    return found


def test_sweep_runs_on_two_nodes_and_lands_in_shared_storage(tmp_path, standin_tasks):
    shared = tmp_path / "shared"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--shared", str(shared), "--timeout-s", "600",
                             "--tasks", *TASKS, "--task-dir", str(standin_tasks)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=840)
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        out, err = proc.communicate()
        pytest.fail(f"two-node run timed out; stderr tail:\n{err[-4000:]}")
    finally:
        _kill_group(proc.pid)
    assert _group(proc.pid) == [] and _left_over(shared) == [], "processes of the run were left behind"

    lines = out.strip().splitlines()
    assert lines, f"no report; stderr tail:\n{err[-4000:]}"
    report = json.loads(lines[-1])
    detail = json.dumps({k: report.get(k) for k in ("problems", "job", "tasks")}, indent=1)[-6000:]
    assert proc.returncode == 0 and report["problems"] == [], detail
    assert report["job"]["status"] == "SUCCEEDED", detail

    # one task per node, read back from the shared folder (what a user of the cluster sees)
    nodes = report["nodes"]
    assert set(nodes) == {"head", "worker"} and len(set(nodes.values())) == 2
    ran_on = {}
    for task in TASKS:
        rec = json.loads((shared / "sweep" / "tasks" / f"{task}.json").read_text())
        assert rec["status"] == "ok", rec.get("error")
        ran_on[task] = rec["node_id"]
        assert (shared / "sweep" / "tasks" / task / "validation_scored.parquet").is_file()
    assert set(ran_on.values()) == set(nodes.values()), (ran_on, nodes)
    assert {report["tasks"][t]["node"] for t in TASKS} == {"head", "worker"}
    for f in ("summary.md", "summary.csv", "summary.json", "sweep_run.json"):
        assert (shared / "sweep" / f).is_file(), f

    # the Jobs API refuses a caller without the cluster's token; nothing listens beyond loopback
    assert report["jobs_api_without_token"] == 401
    assert report["jobs_api"].startswith("http://127.0.0.1:")
    if report["network"].startswith("private"):
        assert set(report["node_ips"].values()) == {"127.0.0.1"}
    print(json.dumps({"job": report["job"]["status"], "job_wall_s": report["job"]["wall_s"],
                      "wall_s": report["wall_s"], "network": report["network"],
                      "tasks": {t: {k: r[k] for k in ("node", "node_id", "pid", "wall_s")}
                                for t, r in report["tasks"].items()}}))
