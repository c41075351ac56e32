"""The download sources against a loopback HTTP server laid out as each source is: every file is
checked against the manifest, a tampered or missing file and a stalled server are named, and the
error after all sources failed lists each one and the way forward. No network beyond 127.0.0.1."""

from __future__ import annotations

import http.server
import threading
import time
from pathlib import Path

import pytest

from cappy_core.data.catalog import TaskCatalog
from cappy_core.data.download import DownloadFailed, LocalCopy, download_tasks, task_rel
from cappy_core.data.release import Manifest, sha256_bytes
from fake_release import manifest_of, release_files, tarball_bytes, write_folder, write_zip

REV = "fakerev"


class Layout:
    """What the server serves: raw files (``/raw/<rev>/bigbench/benchmark_tasks/<path>``) and the
    tarball (``/tarball/<rev>``), each with its own faults."""

    def __init__(self, files):
        self.raw = dict(files)
        self.tar = dict(files)
        self.stall_raw = self.stall_tar = False


@pytest.fixture
def server():
    files = release_files()
    layout = Layout(files)
    stop = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):  # quiet
            pass

        def do_GET(self):
            raw_prefix = f"/raw/{REV}/bigbench/benchmark_tasks/"
            if self.path.startswith(raw_prefix):
                if layout.stall_raw:
                    stop.wait(10)
                    return
                body = layout.raw.get(self.path[len(raw_prefix):])
            elif self.path == f"/tarball/{REV}":
                if layout.stall_tar:
                    self.send_response(200)
                    self.end_headers()
                    stop.wait(10)  # headers sent, then silence
                    return
                body = tarball_bytes(layout.tar)
            else:
                body = None
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield layout, files, {"raw_url": base + "/raw/{revision}/bigbench/benchmark_tasks/{path}",
                          "tarball_url": base + "/tarball/{revision}"}
    stop.set()
    httpd.shutdown()
    httpd.server_close()


def _download(tmp_path, urls, manifest, **kw):
    logs: list[str] = []
    kw.setdefault("timeout", 0.5)
    root = download_tasks(kw.pop("tasks", None), cache_dir=tmp_path / "cache", manifest=manifest,
                          log=logs.append, **urls, **kw)
    return root, logs


def test_raw_files_are_verified_into_the_cache_and_load(tmp_path, server):
    layout, files, urls = server
    manifest = manifest_of(files)
    root, logs = _download(tmp_path, urls, manifest)
    assert sorted(str(p.relative_to(root)) for p in root.rglob("task.json")) == sorted(files)
    assert all((root / p).read_bytes() == b for p, b in files.items())
    assert "GitHub raw files" in logs[0] and "5 task files verified" in logs[0]
    catalog = TaskCatalog.open(tmp_path / "cache", manifest=manifest)
    assert catalog.names == ["fake_choice", "fake_nested", "fake_sorting"]
    assert len(catalog.load("fake_sorting")["validation"]) == 16  # 34 examples: max(int(0.2 * 34), 16)
    layout.raw.clear()  # complete: a second call asks no source
    assert _download(tmp_path, urls, manifest)[1] == []


def test_a_tampered_file_is_refused_with_both_hashes_and_the_tarball_fills_in(tmp_path, server):
    layout, files, urls = server
    manifest = manifest_of(files)
    layout.raw["fake_sorting/task.json"] = files["fake_sorting/task.json"].replace(b"apple", b"appel")
    root, logs = _download(tmp_path, urls, manifest)
    assert (root / "fake_sorting/task.json").read_bytes() == files["fake_sorting/task.json"]
    assert "4 task files verified" in logs[0] and "GitHub tarball" in logs[1] and "1 task files verified" in logs[1]


def test_all_sources_failing_lists_each_with_why_and_the_way_forward(tmp_path, server):
    layout, files, urls = server
    manifest = manifest_of(files)
    bad = files["fake_choice/task.json"] + b" "
    layout.raw["fake_choice/task.json"] = layout.tar["fake_choice/task.json"] = bad
    del layout.raw["fake_nested/beta/task.json"], layout.tar["fake_nested/beta/task.json"]
    local = write_folder({p: b for p, b in files.items() if p.startswith("fake_sorting")}, tmp_path / "copy")
    with pytest.raises(DownloadFailed) as e:
        _download(tmp_path, urls, manifest, from_path=local)
    msg = str(e.value)
    lines = msg.splitlines()
    assert "2 files still missing" in lines[0]
    assert lines[2].startswith("  1. --from ") and "fake_choice/task.json: not in this source" in lines[2]
    assert lines[3].startswith("  2. GitHub raw files at fakerev")
    assert f"fake_choice/task.json has sha256 {sha256_bytes(bad)}, the manifest says " \
           f"{manifest.files['fake_choice/task.json'].sha256}: refused" in lines[3]
    assert "fake_nested/beta/task.json: HTTP 404" in lines[3]
    assert lines[4].startswith("  3. GitHub tarball at fakerev") and "fake_nested/beta/task.json: not in this source" in lines[4]
    assert "cappy data download --from PATH" in lines[-1]
    cache = tmp_path / "cache" / "bigbench-1.0.0" / "benchmark_tasks"
    assert not (cache / "fake_choice/task.json").exists()  # nothing unverified is kept
    assert (cache / "fake_sorting/task.json").is_file() and (cache / "fake_nested/alpha/task.json").is_file()
    # those two tasks are usable, the incomplete one is not listed
    assert TaskCatalog.open(tmp_path / "cache", manifest=manifest).names == ["fake_sorting"]


def test_a_stalled_server_times_out_and_is_named(tmp_path, server):
    layout, files, urls = server
    manifest = manifest_of(files)
    layout.stall_raw = layout.stall_tar = True
    t0 = time.time()
    with pytest.raises(DownloadFailed) as e:
        _download(tmp_path, urls, manifest, tasks=["fake_sorting"])
    assert time.time() - t0 < 8
    msg = str(e.value)
    assert "fake_sorting/task.json" in msg and "no answer (timed out)" in msg
    assert "GitHub tarball at fakerev" in msg and "timed out" in msg.splitlines()[-2]
    layout.stall_raw = False  # raw recovers: the same command completes
    root, _ = _download(tmp_path, urls, manifest, tasks=["fake_sorting"])
    assert (root / "fake_sorting/task.json").is_file()


def test_without_a_pinned_revision_the_github_sources_are_skipped_and_say_so(tmp_path, server):
    _, files, urls = server
    manifest = manifest_of(files, revision=None)
    with pytest.raises(DownloadFailed, match="skipped: no pinned revision .* pass --revision COMMIT"):
        _download(tmp_path, urls, manifest)
    root, _ = _download(tmp_path, urls, manifest, revision=REV)  # --revision
    assert len(list(root.rglob("task.json"))) == 5


@pytest.mark.parametrize("kind", ["folder", "tar.gz", "zip"])
def test_a_local_copy_is_verified_file_by_file(tmp_path, kind):
    files = release_files()
    manifest = manifest_of(files)
    copy = dict(files)
    copy["fake_choice/task.json"] = b"{}"
    if kind == "folder":
        src = write_folder(copy, tmp_path / "checkout")
    elif kind == "zip":
        src = write_zip(copy, tmp_path / "bb.zip")
    else:
        src = tmp_path / "bb.tar.gz"
        src.write_bytes(tarball_bytes(copy))
    with pytest.raises(DownloadFailed, match=r"fake_choice/task.json has sha256 .* refused"):
        _download(tmp_path, {}, manifest, from_path=src, network=False)
    cache = tmp_path / "cache" / "bigbench-1.0.0" / "benchmark_tasks"
    assert sorted(str(p.relative_to(cache)) for p in cache.rglob("task.json")) == sorted(
        p for p in files if p != "fake_choice/task.json")


def test_the_published_sdist_is_trusted_by_its_own_hash_and_nothing_in_it_runs(tmp_path, monkeypatch):
    """With no manifest (this build's case), only the sdist whose sha256 is the published one is
    accepted; its setup.py is never run, and a member that climbs out of the folder is ignored."""
    import cappy_core.data.download as download

    files = release_files()
    mark = tmp_path / "setup_py_ran"
    sdist = tmp_path / "bigbench-1.0.0.tar.gz"
    sdist.write_bytes(tarball_bytes(files, prefix="bigbench-1.0.0", extra={
        "bigbench-1.0.0/setup.py": f"open({str(mark)!r}, 'w').write('x')\n".encode(),
        "bigbench-1.0.0/bigbench/benchmark_tasks/../../../evil/task.json": b"{}",
        "bigbench-1.0.0/bigbench/api/json_task.py": b"# reference code\n"}))
    with pytest.raises(DownloadFailed, match="carries no release manifest"):  # not the published hash
        _download(tmp_path, {}, Manifest(), from_path=sdist, network=False)
    monkeypatch.setattr(download, "SDIST_SHA256", sha256_bytes(sdist.read_bytes()))
    root, _ = _download(tmp_path, {}, Manifest(), from_path=sdist, network=False)
    assert sorted(str(p.relative_to(root)) for p in root.rglob("task.json")) == sorted(files)
    assert (root.parent / "reference_code" / "json_task.py").is_file()
    assert not mark.exists() and not (tmp_path / "evil").exists()


def test_task_paths_never_leave_the_tasks_folder():
    assert task_rel("x/bigbench/benchmark_tasks/tense/task.json") == "tense/task.json"
    assert task_rel("benchmark_tasks/gem/xsum/task.json") == "gem/xsum/task.json"
    for bad in ("benchmark_tasks/../x/task.json", "benchmark_tasks/task.json", "benchmark_tasks/a/b/c/d/e/task.json",
                "bigbench/benchmark_tasks/tense/README.md", "/etc/task.json"):
        assert task_rel(bad) is None, bad
    with pytest.raises(FileNotFoundError, match="no such file"):
        list(LocalCopy(Path("/nonexistent/copy")).members())


def test_the_download_command_explains_every_failure(tmp_path, monkeypatch, capsys):
    """`cappy data download` as a user runs it on a machine with nothing: exit 2, every source named."""
    from jobs.download_data import main

    monkeypatch.setenv("CAPPY_CACHE_DIR", str(tmp_path / "cache"))
    import cappy_core.data.catalog as catalog_mod
    import cappy_core.data.download as download_mod

    for mod in (catalog_mod, download_mod):  # no manifest (this build's case), whatever a later build ships
        monkeypatch.setattr(mod, "load_manifest", lambda: Manifest())
    assert main(["--tasks", "tense", "--from", str(tmp_path / "nowhere.tar.gz"), "--offline"]) == 2
    err = capsys.readouterr().err
    assert "error: could not get tasks tense." in err
    assert f"1. --from {tmp_path / 'nowhere.tar.gz'}: " in err and "no such file or folder" in err
    assert "cappy data download --from PATH" in err
    assert main(["--tasks", "tense"]) == 2
    assert "skipped: the release manifest lists no files to check them against" in capsys.readouterr().err
    assert main(["--tasks", "tenze"]) == 2
    assert "unknown task 'tenze'" in capsys.readouterr().err
