"""`cappy sample` under faults, on the session's Ray with a tiny generator: Ctrl-C mid-run and
a disk that fills mid-write. Each ends the job at once with one clear line (exit 130 / 2, no
traceback), releases the output lock, leaves no temporary file and no partial shard recorded as
finished, keeps what was finished, and a rerun completes to exactly the output of an
uninterrupted run. Slow (sampler runs, one in a subprocess); the fast check of the same write
path is tests/core/test_io_lock.py."""

from __future__ import annotations

import errno
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from cappy_core.labeling.candidates import done_path, read_candidates, shard_path
from cappy_core.data.records import Example, split_path, write_examples
from conftest import REPO

SHARDS = 8  # one instruction per shard: the unit of resume


@pytest.fixture(scope="module")
def args(tmp_path_factory):
    from cappy_core.generation.embedded_model import tiny_generator

    root = tmp_path_factory.mktemp("faults")
    gen = tiny_generator(root / "gen")
    write_examples([Example("alpha", "", "train", i, f"Q: what comes after {i}?\nA:", [f"{i + 1}"])
                    for i in range(SHARDS)], split_path(root / "data", "alpha", "train"))
    return ["--tasks", "alpha", "--splits", "train", "--data", str(root / "data"), "--generator", str(gen),
            "--backend", "hf", "--shard-size", "1", "--sampling.batch-size", "1", "--sampling.decodings", "beam2", "sample",
            "--sampling.samples-per-decoding", "2", "--sampling.max-new-tokens", "4", "--sampling.cpus-per-actor", "0.5", "--dtype", "float32"]


@pytest.fixture(scope="module")
def reference(args, tmp_path_factory, ray_address):
    """The output of an uninterrupted run (in this process, on the session's Ray)."""
    from jobs.sample_label import main

    out = tmp_path_factory.mktemp("reference") / "out"
    assert main([*args, "--out", str(out)]) == 0
    return out


def assert_clean(out: Path) -> None:
    """No lock, no temporary file; every shard recorded as done has its whole file."""
    assert not (out / ".cappy.lock").exists()
    assert not [p for p in out.rglob(".*") if ".tmp-" in p.name]
    for rec_file in out.rglob("*.done.json"):
        rec = json.loads(rec_file.read_text())
        part = rec_file.with_name(rec_file.name.replace(".done.json", ".parquet"))
        assert pq.read_table(part).num_rows == rec["rows"] == 3


@pytest.mark.slow
def test_ctrl_c_exits_at_once_releases_the_lock_and_a_rerun_matches_an_uninterrupted_run(
        tmp_path, args, reference, capsys):
    from jobs.sample_label import main

    out = tmp_path / "out"
    # SIGINT as a terminal's foreground job has it: a suite started in the background of a shell without
    # job control inherits it ignored, and Python then keeps it ignored (the child would never stop)
    proc = subprocess.Popen([sys.executable, "-m", "jobs.sample_label", *args, "--out", str(out)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not list(out.rglob("*.done.json")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - t0 < 15
    assert proc.returncode == 130, err[-3000:]
    assert "error: interrupted (Ctrl-C)" in err and "Traceback" not in err
    done = len(list(out.rglob("*.done.json")))
    assert 1 <= done < SHARDS, "the interrupt should land after the first shard and before the last"
    assert_clean(out)

    assert main([*args, "--out", str(out)]) == 0  # the lock was released: the rerun takes it at once
    assert f"{SHARDS - done} shards written, {done} already done" in capsys.readouterr().out
    assert_clean(out)
    assert read_candidates(out).equals(read_candidates(reference))


@pytest.mark.slow
def test_a_full_disk_fails_naming_the_file_and_keeps_what_was_finished(
        tmp_path, args, reference, monkeypatch, capsys):
    from jobs.sample_label import main

    out = tmp_path / "out"
    shutil.copytree(reference, out)
    for i in range(3, SHARDS):  # a previous run finished shards 0-2
        shard_path(out, "alpha", "train", i).unlink()
        done_path(out, "alpha", "train", i).unlink()
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != "sample_config.json"}

    real, written = pq.write_table, []

    def disk_fills_on_the_second_file(table, where, **kw):
        if written:  # part of the file made it to disk, then the disk was full
            Path(where).write_bytes(b"PAR1" + bytes(64))
            raise OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device")
        written.append(Path(where))
        real(table, where, **kw)

    monkeypatch.setattr(pq, "write_table", disk_fills_on_the_second_file)
    assert main([*args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "No space left on device" in err
    parts = sorted(out.rglob("part-*.parquet"))
    assert len(parts) == 4 and len(list(out.rglob("*.done.json"))) == 4  # 3 from before, 1 written in full
    failed = [shard_path(out, "alpha", "train", i) for i in range(3, SHARDS)
              if shard_path(out, "alpha", "train", i) not in parts]
    assert sum(f"writing {f}: " in err for f in failed) == 1  # the error names the file it was writing
    for p, data in before.items():
        assert p.read_bytes() == data  # the earlier shards and records are untouched
    assert_clean(out)

    monkeypatch.undo()  # space freed: the rerun completes the output
    assert main([*args, "--out", str(out)]) == 0
    assert f"{SHARDS - 4} shards written, 4 already done" in capsys.readouterr().out
    assert_clean(out)
    assert read_candidates(out).equals(read_candidates(reference))
