"""``cappy data vendor``: a copy of the release → manifest + Parquet records, byte-identical on a
rerun, records equal to the ones prepared from the task files, within a size budget."""

from __future__ import annotations

import json

import pytest

from cappy_core.data.bigbench import load_task
from cappy_core.data.catalog import TaskCatalog
from cappy_core.data.release import git_blob_id, load_manifest
from cappy_core.data.vendor import check_vendored, read_canaries, vendor_release
from fake_release import CANARY, release_files, tarball_bytes, write_folder


def _snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_vendor_writes_the_same_bytes_twice_and_records_equal_the_task_files(tmp_path):
    files = release_files()
    src = write_folder(files, tmp_path / "checkout")
    out = tmp_path / "vendored"
    kw = dict(required=["fake_sorting", "fake_nested"], optional=["fake_choice", "not_in_copy"], revision="abc123",
              log=lambda m: None)
    manifest = vendor_release(src, out, **kw)
    first = _snapshot(out)
    assert sorted(first) == ["manifest.json", "tasks/fake_choice.parquet", "tasks/fake_nested.parquet",
                             "tasks/fake_sorting.parquet"]
    vendor_release(src, out, **kw)
    assert _snapshot(out) == first  # byte-identical rerun
    archive = tmp_path / "bb.tar.gz"  # the same files from an archive: the same output
    archive.write_bytes(tarball_bytes(files))
    vendor_release(archive, tmp_path / "v2", **kw)
    assert _snapshot(tmp_path / "v2") == first

    obj = json.loads(first["manifest.json"])
    assert obj["revision"] == "abc123" and sorted(obj["files"]) == sorted(files)
    entry = obj["files"]["fake_sorting/task.json"]
    assert entry["git_blob"] == git_blob_id(files["fake_sorting/task.json"]) and entry["examples"] == 34
    assert obj["files"]["fake_nested/task.json"]["examples"] == 0
    assert obj["left_out"] == {"not_in_copy": "not in this copy of the release"}
    nested = obj["vendored"]["fake_nested"]
    assert nested["sources"] == ["fake_nested/alpha/task.json", "fake_nested/beta/task.json", "fake_nested/task.json"]
    assert nested["canaries"] == [CANARY + " (alpha)", CANARY + " (beta)", CANARY + " (fake_nested)"]
    assert read_canaries(out / "tasks/fake_nested.parquet") == nested["canaries"]  # kept unchanged, in the file too

    # the catalog serves the vendored records: equal to those prepared from the task files
    loaded = load_manifest(out / "manifest.json")
    catalog = TaskCatalog.open(tmp_path / "empty-cache", manifest=loaded)
    assert {t: catalog.where[t][0] for t in catalog.names} == dict.fromkeys(
        ["fake_choice", "fake_nested", "fake_sorting"], "vendored")
    tree = src / "bigbench" / "benchmark_tasks"
    for task in catalog.names:
        assert catalog.load(task) == load_task(tree, task), task
    assert check_vendored(loaded, out, tree) == {}
    assert manifest.vendored == loaded.vendored

    # a changed file is found
    (out / "tasks/fake_choice.parquet").write_bytes(b"x")
    assert "sha256 differs" in check_vendored(loaded, out)["fake_choice"]


def test_the_budget_keeps_required_tasks_and_names_what_it_left_out(tmp_path):
    src = write_folder(release_files(), tmp_path / "checkout")
    out = tmp_path / "v"
    one = vendor_release(src, tmp_path / "probe", required=["fake_sorting"], log=lambda m: None)
    size = (tmp_path / "probe" / one.vendored["fake_sorting"]["file"]).stat().st_size
    m = vendor_release(src, out, required=["fake_sorting"], optional=["fake_choice", "fake_nested"],
                       max_bytes=size + 10, log=lambda m: None)
    assert list(m.vendored) == ["fake_sorting"]
    assert set(m.left_out) == {"fake_choice", "fake_nested"} and "within 0 MiB" in m.left_out["fake_choice"]
    assert sorted(p.name for p in (out / "tasks").iterdir()) == ["fake_sorting.parquet"]
    with pytest.raises(ValueError, match="required tasks alone take"):
        vendor_release(src, out, required=["fake_sorting"], max_bytes=10, log=lambda m: None)
    with pytest.raises(FileNotFoundError, match="required task.*not in this copy: tense"):
        vendor_release(src, out, required=["tense"], log=lambda m: None)


def test_vendor_cli_needs_a_copy(tmp_path, capsys):
    from jobs.vendor_data import main, vendored_task_lists

    assert main(["--out", str(tmp_path)]) == 2
    assert "give --from PATH" in capsys.readouterr().err
    required, optional = vendored_task_lists()
    assert required[:6] == ["simple_text_editing", "tense", "gender_inclusive_sentences_german", "rephrase",
                            "word_sorting", "unnatural_in_context_learning"]
    assert len(required) == 16 and "periodic_elements" in required
    from cappy_core.config import load_yaml
    from jobs.cli import presets
    from jobs.pretrain import PretrainConfig

    assert required[6:] == load_yaml(PretrainConfig, presets("pretrain")["local"])["tasks"]  # in step with the preset
    assert len(optional) == 44 - 6 and "tellmewhy" not in optional
    assert main(["--from", str(tmp_path / "nope"), "--out", str(tmp_path / "v")]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_vendor_check_compares_the_records_with_a_copy(tmp_path, capsys):
    from jobs.vendor_data import main

    files = release_files()
    src = write_folder(files, tmp_path / "checkout")
    out = tmp_path / "v"
    vendor_release(src, out, required=["fake_sorting", "fake_choice"], log=lambda m: None)
    assert main(["--check", "--out", str(out), "--from", str(src)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "2 of 2 vendored tasks agree" and "same records as prepared from the copy" in lines[0]
    changed = dict(files)  # a copy whose task differs: its records differ, and the check says so
    changed["fake_choice/task.json"] = files["fake_choice/task.json"].replace(b"fruit", b"fruits")
    assert main(["--check", "--out", str(out), "--from", str(write_folder(changed, tmp_path / "other"))]) == 1
    out_text = capsys.readouterr().out
    assert "fake_choice: " in out_text and "differ from the vendored" in out_text and "1 of 2" in out_text


def test_the_shipped_records_agree_with_the_manifest():
    """Whatever this build vendors: every file is the manifest's, records digest included, and
    every task keeps its canary."""
    from cappy_core.data.release import vendored_dir

    manifest = load_manifest()
    if not manifest.vendored:
        pytest.skip("this build vendors no BIG-Bench tasks (no copy of the release was at hand)")
    assert check_vendored(manifest, vendored_dir()) == {}
    for task, entry in manifest.vendored.items():
        assert entry["canaries"] and read_canaries(vendored_dir() / entry["file"]) == entry["canaries"], task
        assert all(p in manifest.files for p in entry["sources"])


def test_a_build_that_vendors_tasks_prepares_them_without_any_task_file(tmp_path, monkeypatch):
    """What a build with vendored records does: `cappy data prepare` (and every other reader) takes
    them from the package, with no cache and no task.json, and writes the same records."""
    import cappy_core.data.release as release
    from cappy_core.data.prepare import prepare_tasks
    from cappy_core.data.records import read_examples

    files = release_files()
    src = write_folder(files, tmp_path / "checkout")
    vendor_release(src, tmp_path / "pkg" / "vendored", required=["fake_sorting", "fake_nested"], log=lambda m: None)
    monkeypatch.setattr(release, "vendored_dir", lambda: tmp_path / "pkg" / "vendored")
    monkeypatch.setenv("CAPPY_CACHE_DIR", str(tmp_path / "empty_cache"))
    manifest = prepare_tasks(["fake_sorting", "fake_nested"], tmp_path / "out", log=lambda m: None)
    assert manifest["tasks"]["fake_nested"]["source"].startswith("vendored: ")
    assert manifest["tasks"]["fake_nested"]["subtasks"] == ["fake_nested:alpha", "fake_nested:beta"]
    for task in ("fake_sorting", "fake_nested"):
        want = load_task(src / "bigbench" / "benchmark_tasks", task)
        for split in ("train", "validation"):
            assert read_examples(tmp_path / "out" / task / f"{split}.parquet") == want[split]
    # the release's other tasks are known (the manifest lists them) but not here: named, not "unknown"
    from cappy_core.data.cache import BigBenchNotFound

    with pytest.raises(BigBenchNotFound, match="not on this machine: fake_choice"):
        prepare_tasks(["fake_choice"], tmp_path / "out", log=lambda m: None)


def test_a_malformed_or_empty_copy_is_named_as_the_user_gave_it(tmp_path):
    files = release_files()
    files["fake_sorting/task.json"] = b"{not json"
    src = write_folder(files, tmp_path / "checkout")
    with pytest.raises(ValueError, match=rf"^{src}: fake_sorting/task.json: not valid JSON"):
        vendor_release(src, tmp_path / "v", required=["fake_sorting"], log=lambda m: None)
    m = vendor_release(src, tmp_path / "v", required=["fake_choice"], optional=["fake_sorting"], log=lambda m: None)
    assert m.left_out["fake_sorting"].startswith("fake_sorting/task.json: not valid JSON")
    (tmp_path / "empty.tar.gz").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty.tar.gz: not a readable .tar.gz, .tar or .zip archive \(empty file\)$"):
        vendor_release(tmp_path / "empty.tar.gz", tmp_path / "v", required=["fake_choice"], log=lambda m: None)
