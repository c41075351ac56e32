"""A real two-node Ray cluster on this machine: submit ``cappy sweep`` through the Jobs API and
check that the per-task work ran on both nodes and landed in the shared folder.

    python cluster/local_two_node.py                      # ~1.5 min on 2 cores; last stdout line = JSON
    python cluster/local_two_node.py --shared /tmp/c2n-out --keep

What it does, in order:

0. runs itself again inside a network namespace of its own whose only interface is loopback
   (``unshare --net``), so every Ray server binds 127.0.0.1 (``ray start`` swaps a loopback
   ``--node-ip-address`` for the machine's address; in the namespace there is no other). Where
   no namespace can be made it runs on the host network (``--network host``): then the
   dashboard / Jobs API still binds 127.0.0.1 only, the rest the machine's address;
1. starts a head (``ray start --head --block``, custom resource ``head_node``) and a worker
   (``ray start --address 127.0.0.1:PORT --block``, custom resource ``worker_node``), 1 CPU each,
   with free ports and a temp dir of their own (never the session's Ray or another user's), Ray
   token authentication on with a fresh random token (``RAY_AUTH_MODE=token``, ``RAY_AUTH_TOKEN``);
2. writes a tiny generator and a MiniLM scorer into the shared folder (both nodes see it, as
   they would see NFS or a bucket mount on a real cluster);
3. submits ``python -m jobs.sweep`` with ``JobSubmissionClient`` and ``runtime_env.working_dir``
   = this repository, waits for it, and reads ``OUT/tasks/<task>.json``: each task must be
   ``status: ok`` and the tasks' ``node_id`` must cover both nodes. Each task asks for 1 CPU and
   each node has 1 CPU, so the two tasks cannot share a node. Also checked: the Jobs API answers
   401 to a caller without the token, and nothing listens beyond loopback;
4. stops both nodes (SIGTERM to each ``ray start --block``, which tears its node down) even
   when something failed, then kills, by pid, whatever of their process trees is still alive and
   any process whose command line names this run's temp dir or shared folder. It never runs
   ``ray stop``: that stops every Ray on the machine.

Exit status 0 when every check passed; the last line of stdout is a JSON report (job status,
which node ran which task, wall times, listening sockets). Nothing here calls ``ray.init``: the
script talks to the cluster only over the Jobs and State HTTP APIs, as a user outside it would.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TASKS = ["tense", "rephrase"]  # --tasks
TASK_DIR: list[str] = []  # --task-dir: BIG-Bench-format tasks besides the vendored and cached ones
# The tiny setup of tests/jobs/test_sweep.py, with 1 CPU per task so the two tasks need both nodes.
SWEEP_ARGS = ["--max-examples-per-task", "3", "--sampling.max-new-tokens", "6", "--train-size", "16", "--schedule.batch-size", "8",
              "--schedule.micro-batch-size", "4", "--max-length", "64", "--cpus-per-task", "1", "--sampling.cpus-per-actor", "0.5",
              "--backend", "hf"]
# Not uploaded with the working dir (Ray also honours .gitignore). Never a bare "data": gitignore
# patterns match at any depth, and cappy_core/data is a package.
EXCLUDES = [".git", ".venv", "/outputs", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
NETNS_ENV = "CAPPY_TWO_NODE_PRIVATE_NETWORK"  # set inside the namespace this script made


def log(msg: str) -> None:
    print(f"[two-node {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports that are free on 127.0.0.1 right now."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def ray_env(token: str) -> dict[str, str]:
    """Environment of both nodes and of this client: token auth on, our token, no stray address."""
    # no RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (the session's loopback-only Ray, jobs/local_ray.py): it forbids a 2nd node
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, OMP_NUM_THREADS="1",
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",  # tear down at once on SIGTERM
               RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


class TwoNodes:
    """A head and a worker started with ``ray start --block`` as children of this process."""

    def __init__(self, tmp: Path, token: str, object_store_bytes: int = 300_000_000):
        self.tmp, self.token, self.env = tmp, token, ray_env(token)
        self.object_store_bytes = object_store_bytes
        (self.gcs_port, self.dashboard_port, self.client_port, *self._ports) = free_ports(15)
        self.procs: dict[str, subprocess.Popen] = {}
        self.node_ids: dict[str, str] = {}  # "head" / "worker" -> node id
        self.node_ips: dict[str, str] = {}

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _node_args(self, name: str) -> list[str]:
        p = self._ports[:6] if name == "head" else self._ports[6:12]
        return ["--num-cpus", "1", "--num-gpus", "0",
                "--resources", json.dumps({f"{name}_node": 1}), "--temp-dir", str(self.tmp / name),
                "--object-store-memory", str(self.object_store_bytes), "--node-manager-port", str(p[0]),
                "--object-manager-port", str(p[1]), "--dashboard-agent-listen-port", str(p[2]),
                "--dashboard-agent-grpc-port", str(p[3]), "--runtime-env-agent-port", str(p[4]),
                "--metrics-export-port", str(p[5]), "--disable-usage-stats", "--block"]

    def _start(self, name: str, args: list[str], env: dict[str, str]) -> None:
        ray = str(Path(sys.executable).with_name("ray"))
        logf = open(self.tmp / f"{name}.log", "w")
        self.procs[name] = subprocess.Popen([ray, "start", *args, *self._node_args(name)], env=env,
                                            stdout=logf, stderr=subprocess.STDOUT, cwd=self.tmp)
        logf.close()

    def start(self, timeout_s: float = 120) -> None:
        log(f"head: GCS 127.0.0.1:{self.gcs_port}, dashboard/Jobs API {self.dashboard}")
        self._start("head", ["--head", "--port", str(self.gcs_port), "--include-dashboard", "true",
                             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
                             "--ray-client-server-port", str(self.client_port)], env=self.env)
        self._wait(lambda: len(self._nodes()) == 1, timeout_s, "the head's dashboard")
        self._start("worker", ["--address", f"127.0.0.1:{self.gcs_port}"], env=self.env)
        self._wait(lambda: len(self._nodes()) == 2, timeout_s, "the worker to join")
        for node in self._nodes():
            name = "head" if "head_node" in node["resources_total"] else "worker"
            self.node_ids[name] = node["node_id"]
            self.node_ips[name] = node["node_ip"]
        log(f"nodes alive: {self.node_ids}")

    def _wait(self, ready, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"`ray start` of the {name} exited with {proc.returncode}: "
                                       + (self.tmp / f"{name}.log").read_text()[-3000:])
            try:
                if ready():
                    return
            except Exception:  # not up yet: connection refused, 5xx, a State API error
                pass
            time.sleep(1)
        raise TimeoutError(f"waited {timeout_s:.0f} s for {what}")

    def _nodes(self) -> list[dict]:
        """Alive nodes, from the dashboard's State API (the token comes from RAY_AUTH_TOKEN)."""
        from ray.util.state import list_nodes

        return [{"node_id": n.node_id, "node_ip": n.node_ip, "resources_total": n.resources_total}
                for n in list_nodes(address=self.dashboard, filters=[("state", "=", "ALIVE")], timeout=10)]

    def get(self, path: str, token: str | None = "ours") -> dict:
        req = urllib.request.Request(self.dashboard + path)
        if token:
            req.add_header("Authorization", f"Bearer {self.token if token == 'ours' else token}")
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def status_without_token(self, path: str = "/api/jobs/") -> int:
        """HTTP status of a Jobs API call that carries no token (401 expected)."""
        try:
            self.get(path, token=None)
            return 200
        except urllib.error.HTTPError as e:
            return e.code

    def listening_addresses(self) -> list[str]:
        """``ip:port`` of every listening TCP socket of our nodes' processes."""
        import psutil

        pids = {p.pid for p in self.processes()}
        out = set()
        for c in psutil.net_connections(kind="tcp"):
            if c.status == psutil.CONN_LISTEN and c.pid in pids:
                out.add(f"{c.laddr.ip}:{c.laddr.port}")
        return sorted(out)

    def processes(self) -> list:
        """The ``ray start`` processes and all their descendants (GCS, raylets, dashboard, agents,
        workers, the job driver). Workers retitle themselves (``ray::IDLE``), so their command line
        does not name our temp dir: the process tree does."""
        import psutil

        procs = []
        for proc in self.procs.values():
            try:
                root = psutil.Process(proc.pid)
                procs += [root, *root.children(recursive=True)]
            except psutil.Error:
                pass
        return procs

    def stop(self) -> list:
        """SIGTERM each ``ray start --block`` (worker first), SIGKILL one still there after 30 s;
        returns the processes the nodes had just before (the caller kills any survivor)."""
        tree = self.processes()
        for name in ("worker", "head"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        log("both nodes stopped")
        return tree


def is_loopback(addr: str) -> bool:
    """``ip:port`` on loopback: 127.0.0.0/8, ::1, or IPv4-mapped ::ffff:127.x."""
    ip = ipaddress.ip_address(addr.rsplit(":", 1)[0])
    return ip.is_loopback or bool(getattr(ip, "ipv4_mapped", None) and ip.ipv4_mapped.is_loopback)


def our_processes(*markers: Path) -> list:
    """Processes whose command line names one of ``markers`` (the Ray processes of this run's
    temp dir, the job driver writing into its shared folder), except this process and its
    ancestors (whose command lines name the shared folder too)."""
    import psutil

    me = psutil.Process()
    spare = {me.pid, *(p.pid for p in me.parents())}
    strs = [str(m) for m in markers]
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if p.info["pid"] not in spare and any(s in cmd for s in strs):
            found.append(p)
    return found


def kill_leftovers(tree: list, *markers: Path) -> int:
    """SIGKILL, by pid, what is still alive of ``tree`` or names one of ``markers``."""
    import psutil

    procs = [p for p in tree if p.is_running()] + our_processes(*markers)
    procs = list({p.pid: p for p in procs}.values())
    if procs:
        log("killing what is left: " + ", ".join(f"{p.pid} {_name(p)}" for p in procs))
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=10)
    return len(procs)


def _name(p) -> str:
    try:
        return p.name()
    except Exception:
        return "?"


@contextmanager
def two_nodes(tmp: Path, shared: Path):
    token = secrets.token_hex(32)
    os.environ.update(ray_env(token))  # this process is the client: RAY_AUTH_TOKEN for the Jobs API
    os.environ.pop("RAY_ADDRESS", None)
    nodes = TwoNodes(tmp, token)
    try:
        nodes.start()
        yield nodes
    finally:
        left = kill_leftovers(nodes.stop(), tmp, shared)
        if left:
            log(f"killed {left} leftover process(es) of this run")


def make_models(shared: Path) -> None:
    """A tiny Llama generator and a MiniLM scorer folder in the shared folder."""
    from cappy_core.generation.embedded_model import tiny_generator
    from cappy_core.scorer.model import Scorer

    tiny_generator(shared / "gen")
    Scorer.from_pretrained("minilm", seed=0).save_pretrained(shared / "scorer")


def submit_sweep(nodes: TwoNodes, shared: Path, timeout_s: float) -> dict:
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(nodes.dashboard)
    out = shared / "sweep"
    entrypoint = shlex.join(["python", "-m", "jobs.sweep", "--tasks", *TASKS, *(["--task-dir", *TASK_DIR] if TASK_DIR else []),
                             "--out", str(out), "--cache-dir", str(shared / "cache"), "--generator",
                             str(shared / "gen"), "--scorer", str(shared / "scorer"), *SWEEP_ARGS])
    runtime_env = {"working_dir": str(REPO), "excludes": EXCLUDES,
                   "env_vars": {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                                "RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S": "300"}}
    t0 = time.monotonic()
    job = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env,
                            submission_id=f"cappy-two-node-{int(time.time())}")
    log(f"submitted {job}: {entrypoint}")
    status = None
    try:
        while time.monotonic() - t0 < timeout_s:
            status = str(client.get_job_status(job).value)
            if status in TERMINAL:
                break
            time.sleep(2)
        else:
            log(f"job {job} still {status} after {timeout_s:.0f} s: stopping it")
            client.stop_job(job)
    finally:
        logs = client.get_job_logs(job)
        (shared / "job.log").write_text(logs)
    return {"submission_id": job, "status": status, "wall_s": round(time.monotonic() - t0, 1),
            "entrypoint": entrypoint, "log_tail": logs[-3000:]}


def check(nodes: TwoNodes, shared: Path, job: dict) -> dict:
    """Per-task results: status ok, which node ran it; the checks that must hold."""
    by_id = {v: k for k, v in nodes.node_ids.items()}
    tasks = {}
    for task in TASKS:
        path = shared / "sweep" / "tasks" / f"{task}.json"
        rec = json.loads(path.read_text()) if path.is_file() else {"status": "missing"}
        tasks[task] = {"status": rec.get("status"), "node": by_id.get(rec.get("node_id"), "unknown"),
                       "node_id": rec.get("node_id"), "pid": rec.get("pid"), "wall_s": rec.get("wall_s"),
                       "result": str(path)}
    problems = []
    if job["status"] != "SUCCEEDED":
        problems.append(f"job {job['status']}")
    problems += [f"{t}: {r['status']}" for t, r in tasks.items() if r["status"] != "ok"]
    if {r["node"] for r in tasks.values()} != {"head", "worker"}:
        problems.append(f"tasks did not cover both nodes: {tasks}")
    for f in ("summary.md", "summary.json", "sweep_run.json"):
        if not (shared / "sweep" / f).is_file():
            problems.append(f"missing {shared / 'sweep' / f}")
    return {"tasks": tasks, "problems": problems}


def run(shared: Path, keep: bool, timeout_s: float) -> dict:
    t0 = time.monotonic()
    shared.mkdir(parents=True, exist_ok=True)
    # Ray's socket paths must stay under ~107 characters: a short temp root of our own.
    tmp = Path(tempfile.mkdtemp(prefix="c2n-", dir="/tmp"))
    private = os.environ.get(NETNS_ENV) == "1"
    report: dict = {"shared": str(shared), "ray_temp_dir": str(tmp),
                    "network": "private namespace, loopback only" if private else "host"}
    try:
        make_models(shared)
        with two_nodes(tmp, shared) as nodes:
            report["nodes"] = nodes.node_ids
            report["jobs_api"] = nodes.dashboard
            report["jobs_api_without_token"] = nodes.status_without_token()
            report["node_ips"] = nodes.node_ips
            report["job"] = submit_sweep(nodes, shared, timeout_s)
            report["listening"] = nodes.listening_addresses()  # now, with the job's workers too
            report.update(check(nodes, shared, report["job"]))
        if report["jobs_api_without_token"] != 401:
            report["problems"].append(f"Jobs API without a token answered {report['jobs_api_without_token']}")
        # The dashboard / Jobs API binds 127.0.0.1 in every mode; in the private namespace
        # loopback is all there is, so every socket must be on it.
        exposed = [a for a in report["listening"] if not is_loopback(a)
                   and (private or a.endswith(f":{nodes.dashboard_port}"))]
        if exposed:
            report["problems"].append(f"listening beyond loopback: {exposed}")
    except Exception as e:  # reported, with the nodes already stopped
        report.setdefault("problems", []).append(f"{type(e).__name__}: {e}")
    finally:
        report["wall_s"] = round(time.monotonic() - t0, 1)
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return report


def in_private_network(argv: list[str]) -> int | None:
    """Run this script again inside a new network namespace whose only interface is loopback
    (``unshare --net``; needs root or user namespaces). Returns its exit status, or None when
    no such namespace can be made here."""
    try:
        probe = subprocess.run(["unshare", "--net", "true"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if probe.returncode != 0:
        return None
    cmd = ["unshare", "--net", "--", "sh", "-c", 'ip link set lo up && exec "$@"', "sh",
           sys.executable, str(Path(__file__).resolve()), *argv]
    return subprocess.run(cmd, env={**os.environ, NETNS_ENV: "1"}).returncode


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", type=Path, default=None,
                        help="the folder both nodes use for models and results (default: a new temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the Ray temp dir (logs) and the shared folder")
    parser.add_argument("--timeout-s", type=float, default=900, help="most seconds to wait for the job")
    parser.add_argument("--network", choices=["auto", "private", "host"], default="auto",
                        help="private: a network namespace with only loopback (unshare --net); host: "
                             "this machine's network (Ray then gives nodes the machine's IP; the "
                             "dashboard/Jobs API still binds 127.0.0.1); auto: private if possible")
    parser.add_argument("--tasks", nargs=2, default=TASKS, help="the sweep's two tasks (default: %(default)s)")
    parser.add_argument("--task-dir", default=None, help="a folder of BIG-Bench-format tasks (<dir>/<task>/task.json) "
                        "both nodes can read, for tasks this machine does not have")
    args = parser.parse_args(argv)
    TASKS[:] = args.tasks
    TASK_DIR[:] = [str(Path(args.task_dir).resolve())] if args.task_dir else []
    if args.network != "host" and os.environ.get(NETNS_ENV) != "1":
        rc = in_private_network(argv)
        if rc is not None:
            return rc
        if args.network == "private":
            log("cannot make a network namespace here (unshare --net failed)")
            return 2
        log("no network namespace available: running on the host network")
    shared = (args.shared or Path(tempfile.mkdtemp(prefix="cappy-two-node-"))).resolve()
    report = run(shared, args.keep, args.timeout_s)
    if not args.keep and args.shared is None:
        shutil.rmtree(shared, ignore_errors=True)
    for p in report.get("problems", []):
        log(f"PROBLEM: {p}")
    print(json.dumps(report))
    return 0 if not report.get("problems") else 1


if __name__ == "__main__":
    sys.exit(main())
