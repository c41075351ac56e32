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
    ("jobs.finetune", ["--task", "tense", "--name", "other", "--storage-path", "{tmp}", "--output", "{tmp}/shared"],
     "{tmp}/shared", True),
    ("jobs.eval_mc", ["--tasks", "x", "--scorers", "minilm"], "{tmp}/mc.json", True),
])
def test_a_second_run_on_a_locked_output_refuses_naming_the_holder(tmp_path, capsys, job, args, target, file):
    import importlib

    target = target.format(tmp=tmp_path)
    out_flag = [] if job in ("jobs.pretrain", "jobs.finetune") else ["--out", target]
    argv = [a.format(tmp=tmp_path) for a in args] + out_flag
    with output_lock(target, "the first run", file=file) as lock:
        before = sorted(p.name for p in tmp_path.rglob("*"))
        status = importlib.import_module(job).main(argv)
        err = capsys.readouterr().err
        assert status == 2, err
        assert f"in use by the first run on host {os.uname().nodename}, pid {os.getpid()}, started" in err
        assert str(lock) in err and "Traceback" not in err
        assert sorted(p.name for p in tmp_path.rglob("*")) == before  # refused before writing anything


OTHER_SCHEMES = "is not supported (only local paths and file:// URIs"
UNKNOWN = "unknown scheme foo:// (neither pyarrow.fs nor fsspec knows it"


@pytest.mark.parametrize("job, args, message", [
    # --out of the sampler and the sweep, and the training jobs' --storage-path and --output take
    # any URI pyarrow or fsspec knows (cappy_core.remote)
    ("jobs.sample_label", ["--tasks", "tense", "--out", "foo://bucket/cands"], UNKNOWN),
    ("jobs.sweep", ["--tasks", "tense", "--out", "foo://bucket/sweep"], UNKNOWN),
    ("jobs.pretrain", ["--storage-path", "foo://bucket/runs"], UNKNOWN),
    ("jobs.finetune", ["--task", "tense", "--output", "foo://bucket/scorer"], UNKNOWN),
    ("jobs.eval_mc", ["--tasks", "x", "--scorers", "minilm", "--out", "s3://bucket/mc.json"], OTHER_SCHEMES),
])
def test_unsupported_uris_are_refused_not_made_local_folders(tmp_path, monkeypatch, capsys, job, args, message):
    import importlib

    monkeypatch.chdir(tmp_path)
    status = importlib.import_module(job).main(args)
    err = capsys.readouterr().err
    assert status == 2 and message in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # no ./s3:/bucket/... folder


def test_a_file_uri_out_is_the_folder_it_names(tmp_path, capsys):
    from jobs.sweep import main

    with output_lock(tmp_path / "my out", "the first run"):
        assert main(["--tasks", "tense", "--out", f"file://{tmp_path}/my%20out"]) == 2
    assert f"{tmp_path}/my out is in use by the first run" in capsys.readouterr().err
