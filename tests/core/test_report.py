"""The sweep's report (cappy_core.report) on hand-made per-task numbers: the mean row, Cappy minus
the best baseline, failed tasks listed, the files written, and the method order."""

from __future__ import annotations

import csv
import json

import pytest

from cappy_core.evaluation import evaluate_task, method_order
from cappy_core.report import markdown_table, progress_line, summary_rows, table_methods, write_reports

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


def test_columns_follow_evaluation_method_order():
    """One order: the table's columns are cappy_core.evaluation.method_order (what evaluate_task
    reports), anything else after it alphabetically."""
    assert table_methods(set(method_order())) == method_order()
    assert table_methods({"random", "zz_new", "beam4", "cappy", "aa_new"}) == ["cappy", "beam4", "random", "aa_new",
                                                                                "zz_new"]
    from cappy_core.evaluation import ScoredCandidate as C

    group = [C(decoding=d, sample_idx=0, rouge=0.5, logprob_sum=-1.0, logprob_mean=-1.0, score=1.0)
             for d in ("beam4", "sample", "temp0.9", "topk40", "topp0.95")]
    metrics = evaluate_task([group])
    header, _, _ = summary_rows({"t": metrics})
    assert header[1:-1] == list(metrics) == method_order()


def test_progress_line():
    rec = {"metrics": {"cappy": 31.25, "beam4": 20.0, "oracle": 50.0}, "wall_s": 12.4}
    assert progress_line("tense", rec) == "tense: cappy 31.2, beam4 20.0, oracle 50.0 (12s)"
