"""`cappy_core.remote`: an output URI built in a staging folder and synced to fsspec's in-process
`memory://` filesystem (reached through pyarrow, as S3 or GCS would be)."""

from __future__ import annotations

from pathlib import Path

import fsspec
import pytest

from cappy_core.remote import StagedOutput, locked_output, sync_outputs


@pytest.fixture
def mem(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPPY_STAGING_DIR", str(tmp_path / "staging"))
    fs = fsspec.filesystem("memory")
    root = f"/bucket/{tmp_path.name}"
    yield fs, root
    fs.rm(root, recursive=True)


def test_sync_uploads_what_changed_pulls_what_is_there_and_never_deletes_a_foreign_file(mem, tmp_path):
    fs, root = mem
    uri = f"memory:/{root}/out"
    fs.pipe(f"{root}/out/theirs.txt", b"not the job's")
    fs.pipe(f"{root}/out/old/result.json", b'{"a": 1}')
    with locked_output(uri, "--out", "test", log=lambda _: None) as out:
        out = tmp_path / "staging" / out.rsplit("/", 1)[1]
        assert (out / "theirs.txt").read_bytes() == b"not the job's"  # pulled before the job starts
        assert (out / ".cappy.lock").is_file()  # the lock is local
        (out / "tasks").mkdir()
        (out / "tasks" / "a.json").write_text("1")
        (out / "logs").mkdir()
        (out / "logs" / "job.log").write_text("growing")
        sync_outputs()
        assert fs.cat(f"{root}/out/tasks/a.json") == b"1"
        assert not fs.exists(f"{root}/out/logs/job.log")  # the log: by the last sync only
        (out / "theirs.txt").unlink()  # the job removes its copy: the URI keeps the file
        (out / "old" / "result.json").write_text('{"a": 2}')
        (out / ".x.tmp-12-0123abcd.json").write_text("half")  # an atomic write in flight: never uploaded
    assert sorted(fs.find(f"{root}/out")) == [f"{root}/out/{p}" for p in ("logs/job.log", "old/result.json",
                                                                          "tasks/a.json", "theirs.txt")]
    assert fs.cat(f"{root}/out/theirs.txt") == b"not the job's" and fs.cat(f"{root}/out/old/result.json") == b'{"a": 2}'

    staged = StagedOutput.open(uri, "--out")
    assert staged.push() == 0  # nothing changed since the last sync
    fs.pipe(f"{root}/out/tasks/a.json", b"22")  # changed at the URI (another machine)
    fs.rm(f"{root}/out/old/result.json")  # removed at the URI: a rerun recomputes it
    assert staged.pull() == 2  # a.json, and theirs.txt that the job had removed locally
    assert (staged.local / "tasks" / "a.json").read_text() == "22"
    assert not (staged.local / "old" / "result.json").exists()


def test_unknown_schemes_and_missing_packages_are_refused_naming_the_flag(tmp_path):
    with pytest.raises(ValueError, match=r"--out foo://x: unknown scheme foo:// \(neither pyarrow.fs nor fsspec"):
        with locked_output("foo://x", "--out", "test"):
            pass
    # a scheme fsspec knows whose package (ocifs) is not installed; pyarrow does not know it
    with pytest.raises(ValueError, match=r"--out oci://b/x: oci:// needs a package that is not installed "
                                         r"\(fsspec: Install ocifs"):
        with locked_output("oci://b/x", "--out", "test"):
            pass
    assert list(tmp_path.iterdir()) == []


def test_what_finished_before_an_error_is_uploaded_and_the_error_kept(mem):
    fs, root = mem
    with pytest.raises(RuntimeError, match="task b failed"):
        with locked_output(f"memory:/{root}/out", "--out", "test", log=lambda _: None) as out:
            Path(out, "a.json").write_text("done")
            raise RuntimeError("task b failed")
    assert fs.cat(f"{root}/out/a.json") == b"done"
