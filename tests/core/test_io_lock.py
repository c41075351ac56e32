"""`cappy_core.io.output_lock`: one run per output; a held lock refuses naming its holder, a lock
left by a killed run is taken over, another host's is never assumed stale."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cappy_core.io import LOCK_NAME, OutputLocked, lock_path_for, output_lock

from conftest import REPO

HOLD = ("import sys, time; from cappy_core.io import output_lock\n"
        "with output_lock(sys.argv[1], 'holder-job'):\n"
        "    print('held', flush=True); time.sleep(60)\n")


def test_second_run_refused_naming_the_holder_and_killed_holder_taken_over(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], cwd=REPO, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "held"
        rec = json.loads((out / LOCK_NAME).read_text())
        assert rec["pid"] == holder.pid and rec["host"] == socket.gethostname()
        with pytest.raises(OutputLocked) as e:
            with output_lock(out, "second"):
                pass
        msg = str(e.value)
        for part in (str(out), "holder-job", f"pid {holder.pid}", f"host {socket.gethostname()}", rec["started"]):
            assert part in msg
        assert json.loads((out / LOCK_NAME).read_text()) == rec  # the refusal left the holder's lock alone
        holder.send_signal(signal.SIGKILL)  # no cleanup runs: the lock file stays, stale
        holder.wait()
        assert (out / LOCK_NAME).is_file()
        with output_lock(out, "third") as path:
            assert json.loads(path.read_text())["pid"] == os.getpid()
        assert not path.exists()  # released on exit
    finally:
        holder.kill()
        holder.wait()


def test_reused_pid_other_host_release_on_error_and_file_locks(tmp_path):
    lock = tmp_path / LOCK_NAME
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": "x"}
    lock.write_text(json.dumps({**me, "proc_start": "-1"}))  # our pid, another process's start time: reused
    with output_lock(tmp_path):
        pass
    lock.write_text(json.dumps({**me, "host": "node-7"}))  # cannot check another host's pids
    with pytest.raises(OutputLocked, match=f"host node-7.*delete {lock}"):
        with output_lock(tmp_path):
            pass
    lock.unlink()
    with pytest.raises(KeyError):  # released when the body raises
        with output_lock(tmp_path):
            raise KeyError("boom")
    assert not lock.exists()
    with output_lock(tmp_path):  # nested in one process: still refused (it is a second run of the output)
        with pytest.raises(OutputLocked, match=f"pid {os.getpid()}"):
            with output_lock(tmp_path):
                pass
    results = tmp_path / "mc.json"
    assert lock_path_for(results, file=True) == tmp_path / ".mc.json.lock"
    with output_lock(results, file=True) as p:
        assert p == tmp_path / ".mc.json.lock" and not results.exists()


def test_path_options_take_file_uris_and_refuse_other_schemes(tmp_path):
    from dataclasses import dataclass, field

    from cappy_core.io import local_path, with_local_paths

    assert local_path("runs/x", "--out") == "runs/x" and local_path(None, "--out") is None
    assert local_path(f"file://{tmp_path}/a%20b", "--out") == f"{tmp_path}/a b"
    for uri in ("s3://bucket/runs", "gs://b/x", "hdfs://nn/x", "memory://x"):
        with pytest.raises(ValueError, match=f"--storage-path {uri}: {uri.split(':')[0]}:// is not supported"):
            local_path(uri, "--storage-path")

    @dataclass
    class Cfg:
        out: str = "file:///tmp/o"
        task_dir: list = field(default_factory=lambda: ["file:///tmp/t", "rel"])
        other: str = "s3://untouched"

    assert with_local_paths(Cfg(), "out", "task_dir") == Cfg(out="/tmp/o", task_dir=["/tmp/t", "rel"])


def test_atomic_dir_swap_never_leaves_a_reader_without_a_whole_checkpoint(tmp_path):
    """Readers of a checkpoint being replaced again and again always find it (the swap is one
    renameat2 exchange on Linux), and each sees one version whole."""
    import threading

    from cappy_core.io import atomic_dir

    dest = tmp_path / "scorer"
    dest.mkdir()
    (dest / "config.json").write_text("0")
    (dest / "weights").write_text("0")
    misses, whole, stop, first = [], [], threading.Event(), threading.Event()

    def read_at(fd, name):
        f = os.open(name, os.O_RDONLY, dir_fd=fd)
        try:
            return os.read(f, 16)
        finally:
            os.close(f)

    def same(st, other):
        return (st.st_dev, st.st_ino) == (other.st_dev, other.st_ino)

    def read():  # as a loader does: open the folder once, read its files from it
        while not stop.is_set():
            try:
                fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
            except FileNotFoundError as e:
                misses.append(str(e))
                continue
            try:
                a, b = (read_at(fd, n) for n in ("config.json", "weights"))
                if a != b:
                    misses.append(f"mixed {a} {b}")
                whole.append(a)
                first.set()
            except FileNotFoundError as e:
                # Allowed only when the folder this reader opened is no longer dest: it was swapped out
                # and is being deleted (the reader opens the new one next). The open descriptor keeps
                # its inode alive, so a folder still at dest has the same identity: a file missing from
                # the checkpoint in place is a miss. (A swapped-out folder never comes back, so an
                # allowed miss is never counted.)
                try:
                    if same(os.fstat(fd), os.stat(dest)):
                        misses.append(f"missing in place: {e}")
                except FileNotFoundError as gone:
                    misses.append(str(gone))
            finally:
                os.close(fd)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        assert first.wait(30), "the reader read nothing"  # it reads before, during and after the swaps
        for i in range(1, 300):
            with atomic_dir(dest) as tmp:
                (tmp / "config.json").write_text(str(i))
                (tmp / "weights").write_text(str(i))
    finally:
        stop.set()
        reader.join()
    assert (dest / "config.json").read_text() == "299" and misses == [] and whole
    assert [p.name for p in tmp_path.iterdir()] == ["scorer"]  # no old or temporary folder left


def test_a_full_disk_names_the_output_keeps_the_old_one_and_releases_the_lock(tmp_path):
    import errno

    from cappy_core.io import atomic_dir, atomic_path, write_text

    out = tmp_path / "out"
    write_text(out / "summary.md", "old summary")
    (out / "ckpt").mkdir()
    (out / "ckpt" / "model.safetensors").write_text("old weights")

    def full(f: Path):
        f.write_text("half a fi")  # part of it reached the disk
        raise OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device")

    with pytest.raises(OSError) as e:
        with output_lock(out, "job"):
            with atomic_path(out / "summary.md") as tmp:
                full(tmp)
    assert e.value.errno == errno.ENOSPC and str(e.value).startswith(f"[Errno 28] writing {out / 'summary.md'}: ")
    with pytest.raises(OSError, match=f"writing {out / 'ckpt'}: .*No space left on device"):
        with atomic_dir(out / "ckpt") as tmp:
            full(tmp / "model.safetensors")
    with pytest.raises(FileNotFoundError) as other:  # other errors pass through as they were
        with atomic_path(out / "x.json"):
            raise FileNotFoundError(errno.ENOENT, "gone", "/elsewhere")
    assert other.value.filename == "/elsewhere"
    assert (out / "summary.md").read_text() == "old summary"
    assert (out / "ckpt" / "model.safetensors").read_text() == "old weights"
    assert sorted(p.name for p in out.rglob("*")) == ["ckpt", "model.safetensors", "summary.md"]  # no lock, no temp
