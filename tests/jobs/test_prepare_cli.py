"""`cappy data prepare` end to end, as a user runs it (subprocess)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from conftest import REPO, TEST_DATA



def run(*args):
    return subprocess.run([sys.executable, "-m", "jobs.prepare_data", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.bigbench
def test_prepare_all45_writes_88_files_and_resumes(tmp_path, bigbench_root):
    out = tmp_path / "bb"
    proc = run("--tasks", "all45", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    files = sorted(out.rglob("*.parquet"))
    assert len(files) == 88
    assert "tellmewhy is not in bigbench==1.0.0" in proc.stdout and "--task-dir" in proc.stdout
    expected = {r["task"]: (int(r["train"]), int(r["validation"])) for r in csv.DictReader(open(TEST_DATA / "bigbench_split_sizes.csv"))}
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["tasks"]) == set(expected) and set(manifest["unavailable"]) == {"tellmewhy"}
    for task, (n_train, n_val) in expected.items():
        assert pq.read_metadata(out / task / "train.parquet").num_rows == n_train
        assert pq.read_metadata(out / task / "validation.parquet").num_rows == n_val
    schema = pq.read_schema(out / "tense" / "train.parquet")
    assert schema.names == ["task", "subtask", "split", "example_idx", "instruction", "references", "choices", "choice_scores"]

    # A rerun keeps finished files (resume after an interruption) and rewrites a deleted one.
    (out / "tense" / "validation.parquet").unlink()
    mtime = (out / "word_sorting" / "train.parquet").stat().st_mtime_ns
    proc = run("--tasks", "all45", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "2 Parquet files written, 86 already there" in proc.stdout
    assert (out / "word_sorting" / "train.parquet").stat().st_mtime_ns == mtime
    assert pq.read_metadata(out / "tense" / "validation.parquet").num_rows == expected["tense"][1]


def test_unknown_task_and_bad_config_are_clear_errors(tmp_path):
    proc = run("--tasks", "word_sortin", "--out", str(tmp_path))
    assert proc.returncode == 2
    assert "unknown task 'word_sortin'" in proc.stderr and "word_sorting" in proc.stderr
    cfg = tmp_path / "c.yaml"
    cfg.write_text("taks: [tense]\n")
    proc = run("--config", str(cfg))
    assert proc.returncode == 2 and "unknown key 'taks'" in proc.stderr and "tasks" in proc.stderr
    proc = run("--tasks", "tense", "--out", str(tmp_path), "--task-dir", str(tmp_path / "nope"))
    assert proc.returncode == 2 and "nope" in proc.stderr


def test_cli_help_lists_commands():
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "--help"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0
    for cmd in ("data download", "data vendor", "data prepare", "score"):
        assert cmd in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "data"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "data prepare" in proc.stderr
