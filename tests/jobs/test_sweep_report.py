"""The sweep's summary on hand-made per-task numbers: the mean row, Cappy minus the best baseline,
failed tasks listed, and the three files written."""

from __future__ import annotations

import csv
import json

import pytest

from jobs.sweep_report import markdown_table, summary_rows, write_reports

PER_TASK = {
    "a": {"cappy": 30.0, "beam4": 20.0, "sample": 10.0, "self_score_mean": 25.0, "oracle": 40.0, "random": 12.0},
    "b": {"cappy": 10.0, "beam4": 16.0, "sample": 8.0, "self_score_mean": 5.0, "oracle": 20.0, "random": 6.0},
}


def test_summary_rows_numbers():
    header, rows, summary = summary_rows(PER_TASK)
    assert header == ["task", "cappy", "beam4", "sample", "self_score_mean", "oracle", "random", "cappy - best"]
    assert rows[-1] == ["mean", 20.0, 18.0, 9.0, 15.0, 30.0, 9.0, 2.0]
    # per task, Cappy minus the baseline that is best on the mean (beam4), not the task's own best
    assert rows[0][-1] == 10.0 and rows[1][-1] == -6.0
    assert summary["best_baseline"] == "beam4" and summary["cappy_minus_best"] == pytest.approx(2.0)
    md = markdown_table(header, rows)
    assert md.splitlines()[-1] == "| **mean** | 20.0 | 18.0 | 9.0 | 15.0 | 30.0 | 9.0 | 2.0 |"


def test_write_reports_lists_failures_and_writes_files(tmp_path):
    records = {t: {"status": "ok", "metrics": m} for t, m in PER_TASK.items()}
    records["c"] = {"status": "failed", "error": "RuntimeError: boom"}
    records["d"] = {"task": "d", "status": "missing"}
    lines = []
    summary = write_reports(tmp_path, records, log=lines.append)
    assert summary["finished"] == 2 and set(summary["failed"]) == {"c", "d"}
    md = (tmp_path / "summary.md").read_text()
    assert "- c: RuntimeError: boom" in md and "Cappy − best = +2.0" in md
    rows = list(csv.reader((tmp_path / "summary.csv").open()))
    assert [r[0] for r in rows] == ["task", "a", "b", "mean"]
    assert (tmp_path / "summary.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "summary.json").read_text())["best_baseline_value"] == 18.0


def test_nothing_finished_is_reported_not_crashed(tmp_path):
    summary = write_reports(tmp_path, {"a": {"status": "failed", "error": "x"}}, log=lambda s: None)
    assert summary["finished"] == 0 and "No task finished" in (tmp_path / "summary.md").read_text()


def test_presets_resolve_to_the_documented_settings():
    """local: the six DESIGN.md tasks on CPU; paper: the 45 tasks, 17 candidates, the paper's finetuning."""
    from jobs.sweep import LOCAL_TASKS, JOB, SweepConfig
    from jobs.train_scorer import build_parser, config_from_args

    parser = build_parser(SweepConfig, JOB, None, "", "")
    local = config_from_args(SweepConfig, parser.parse_args(["--preset", "local"]), JOB)
    assert local.tasks == LOCAL_TASKS and local.gpus_per_task == 0 and local.scorer is None
    paper = config_from_args(SweepConfig, parser.parse_args(["--preset", "paper", "--num-actors", "16"]), JOB)
    assert paper.tasks == ["all45"] and paper.max_examples_per_task is None
    assert (paper.train_size, paper.lr, paper.batch_size, paper.max_length) == (102400, 2e-5, 128, 512)
    assert paper.gpus_per_actor == 1 and paper.gpus_per_task == 1 and paper.num_actors == 16
    from cappy_core.generation import candidates_per_instruction, decodings_from_names

    assert candidates_per_instruction(decodings_from_names(paper.decodings, paper.samples_per_decoding)) == 17
