"""Each job that writes an output refuses at once, before any work, when another run holds the
output's lock, and says who holds it (`cappy_core.io.output_lock`)."""

from __future__ import annotations

import os

import pytest

from cappy_core.io import output_lock


@pytest.mark.parametrize("job, args, target, file", [
    ("jobs.sample_label", ["--tasks", "tense", "--data", "{tmp}/data"], "{tmp}/out", False),
    ("jobs.sweep", ["--tasks", "tense"], "{tmp}/out", False),
    ("jobs.pretrain", ["--name", "run", "--storage-path", "{tmp}"], "{tmp}/run", False),
    ("jobs.eval_mc", ["--tasks", "x", "--scorers", "minilm"], "{tmp}/mc.json", True),
])
def test_a_second_run_on_a_locked_output_refuses_naming_the_holder(tmp_path, capsys, job, args, target, file):
    import importlib

    target = target.format(tmp=tmp_path)
    out_flag = [] if job == "jobs.pretrain" else ["--out", target]
    argv = [a.format(tmp=tmp_path) for a in args] + out_flag
    with output_lock(target, "the first run", file=file) as lock:
        before = sorted(p.name for p in tmp_path.rglob("*"))
        status = importlib.import_module(job).main(argv)
        err = capsys.readouterr().err
        assert status == 2, err
        assert f"in use by the first run on host {os.uname().nodename}, pid {os.getpid()}, started" in err
        assert str(lock) in err and "Traceback" not in err
        assert sorted(p.name for p in tmp_path.rglob("*")) == before  # refused before writing anything
