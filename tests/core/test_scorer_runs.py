"""Scorer training runs on disk: paths, the resume key and its check, the run record, the
between-update bookkeeping (eval / report cadence) and the summary line."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest

from cappy_core.config import ConfigError
from cappy_core.io import LOCK_NAME, atomic_dir
from cappy_core.scorer.runs import (OUTPUT_MARKER, RUN_RECORD, RunProgress, TrainOutcome, check_output,
                                    check_run_dir, format_metrics, resolve_paths, resume_key, summary_line,
                                    write_run_record)
from cappy_core.scorer.schedule import ScorerSchedule
from cappy_core.scorer.train_state import TrainState


def settings(**changes):
    """A finetune job's config with these schedule settings."""
    from jobs.finetune import FinetuneConfig

    return FinetuneConfig(init="minilm", log_every=10, schedule=ScorerSchedule(**changes))


def test_resolve_paths_defaults_under_the_run(tmp_path):
    paths = resolve_paths("run", str(tmp_path))
    assert paths == {"name": "run", "storage_path": str(tmp_path), "run_dir": str(tmp_path / "run"),
                     "pairs_dir": str(tmp_path / "run" / "pairs"), "output": str(tmp_path / "run" / "scorer")}
    assert resolve_paths("run", str(tmp_path), output=str(tmp_path / "x"))["output"] == str(tmp_path / "x")


def test_resume_key_is_the_defining_settings_with_every_schedule_field():
    from dataclasses import fields

    key = resume_key(settings(), {"task": "t"})
    assert set(key) == {"init", "train_size", "eval_size", "max_length", "num_workers", "task"} \
        | {f.name for f in fields(ScorerSchedule)}  # a new recipe field is in the key at once
    assert resume_key(settings(loss="listwise", group_by_instruction=True), {})["loss"] == "listwise"
    assert "log_every" not in key and "max_failures" not in key  # how a run reports, not what it trains


def test_a_run_recorded_before_a_schedule_setting_existed_resumes_at_its_default(tmp_path):
    paths = resolve_paths("run", str(tmp_path))
    key = resume_key(settings(), {"task": "t"})
    write_run_record(paths, {k: v for k, v in key.items() if k not in ("bf16", "max_grad_norm", "loss")}, {})
    assert check_run_dir(paths, key, log=lambda *_: None) is True  # recorded before: defaults, same run
    with pytest.raises(ConfigError, match=r"different config \(bf16: None -> True\)"):
        check_run_dir(paths, resume_key(settings(bf16=True), {"task": "t"}))


def test_check_run_dir_resumes_refuses_a_different_config_and_fresh_deletes(tmp_path):
    paths = resolve_paths("run", str(tmp_path))
    key = resume_key(settings(), {"task": "t"})
    assert check_run_dir(paths, key, log=lambda *_: None) is False  # nothing there yet
    write_run_record(paths, key, {"everything": 1})
    record = json.loads((tmp_path / "run" / RUN_RECORD).read_text())
    assert record == {"key": key, "config": {"everything": 1}}
    logs = []
    assert check_run_dir(paths, key, log=logs.append) is True and "resuming run 'run'" in logs[0]
    changed = resume_key(settings(lr=2, loss="listwise", group_by_instruction=True), {"task": "t"})
    with pytest.raises(ConfigError, match=r"different config \(group_by_instruction: False -> True, "
                                          r"loss: 'mse' -> 'listwise', lr: 2e-05 -> 2\)"):
        check_run_dir(paths, changed)
    (tmp_path / "run" / "checkpoint_0" / "x").mkdir(parents=True)
    (tmp_path / "run" / LOCK_NAME).write_text("{}")  # the lock this run holds
    assert check_run_dir(paths, changed, fresh=True, log=lambda *_: None) is False
    assert [p.name for p in (tmp_path / "run").iterdir()] == [LOCK_NAME]  # everything else deleted


def test_names_that_leave_the_storage_path_are_refused(tmp_path):
    for bad in ("..", ".", "", "a/b", "../x", "/abs", " run"):
        with pytest.raises(ConfigError, match="single folder name"):
            resolve_paths(bad, str(tmp_path))
    assert resolve_paths("run-1.v2", str(tmp_path))["run_dir"] == str(tmp_path / "run-1.v2")


def test_output_that_is_not_the_jobs_own_is_refused(tmp_path, monkeypatch):
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work / "sub")
    storage = str(tmp_path / "runs")
    for output, match in ((".", "working directory"), ("..", "working directory"), (str(tmp_path), "working directory"),
                          (str(tmp_path / "runs" / "run"), "run folder"), (str(tmp_path / "runs"), "run folder"),
                          (str(work / "notes.txt"), "not a folder"), (str(work), "working directory")):
        with pytest.raises(ConfigError, match=match):
            check_output(resolve_paths("run", storage, output=output))
    other = tmp_path / "other"
    (other / "keep.txt").parent.mkdir()
    (other / "keep.txt").write_text("user data")
    with pytest.raises(ConfigError, match=f"non-empty folder that this job did not write .*{OUTPUT_MARKER}"):
        check_output(resolve_paths("run", storage, output=str(other)))
    assert (other / "keep.txt").read_text() == "user data"
    check_output(resolve_paths("run", storage, output=str(tmp_path / "new")))  # missing: fine
    (tmp_path / "empty").mkdir()
    check_output(resolve_paths("run", storage, output=str(tmp_path / "empty")))
    (other / OUTPUT_MARKER).write_text("{}")  # a scorer this job exported earlier: replaced on a rerun
    check_output(resolve_paths("run", storage, output=str(other)))
    default = resolve_paths("run", storage)  # RUN_DIR/scorer is the run's own even without the marker
    (tmp_path / "runs" / "run" / "scorer").mkdir(parents=True)
    (tmp_path / "runs" / "run" / "scorer" / "config.json").write_text("{}")
    check_output(default)
    for dest in (".", "..", str(work)):  # the last line of defence: atomic_dir never swaps out the cwd
        with pytest.raises(ValueError, match="working directory"):
            with atomic_dir(dest):
                pass
    assert (work / "notes.txt").read_text() == "mine" and (work / "sub").is_dir()


def test_run_progress_logs_evaluates_and_reports_on_its_cadence():
    state = TrainState()
    reports, logs = [], []
    progress = RunProgress(state, 5, report=lambda m, ckpt: reports.append((m, ckpt)),
                           evaluate=lambda: {"mse": float("nan"), "n": 3}, log_every=2, eval_every=2,
                           checkpoint_every=4, log=logs.append)
    progress.begin()
    assert reports == [({"update": 0, "eval_mse": None, "eval_n": 3}, False)]  # NaN reported as None
    for u in range(1, 6):
        state.update, state.samples = u, 4 * u
        state.losses.append(float(u))
        progress(SimpleNamespace(update=u, loss=float(u), lr=0.1))
    assert [(m["update"], ckpt) for m, ckpt in reports[1:]] == [(2, False), (4, True), (5, True)]
    assert [m["loss"] for m, _ in reports[1:]] == [1.5, 3.5, 5.0]  # mean since the previous report
    assert [e["update"] for e in state.evals] == [0, 2, 4, 5] and math.isnan(state.evals[0]["mse"])
    assert sum(line.startswith("[train] update") for line in logs) == 3  # updates 2, 4 and the last
    progress.begin()  # not a fresh run any more: no second eval at update 0
    assert len(state.evals) == 4


def test_summary_line():
    ev = {"mse": 0.25, "pearson": float("nan"), "spearman": 0.5, "pairwise_acc": 0.75, "n": 8, "pairs": 4}
    assert format_metrics(ev) == "mse 0.250, pearson n/a, spearman 0.500, pairwise_acc 0.750 (n 8, pairs 4)"
    out = TrainOutcome(output="/x", updates=10, total_updates=10, seconds=3.2, losses=[1.0] + [0.5] * 9,
                       evals=[ev, ev], checkpoint_path="/c")
    assert summary_line("finetune t", out) == (
        "finetune t: 10/10 updates in 3s, loss 1.0000 -> 0.5000; eval before: " + format_metrics(ev)
        + "; after: " + format_metrics(ev) + "; scorer -> /x")
    assert "no eval" in summary_line("x", TrainOutcome("/x", 0, 1, 0.0, [], [], "/c"))
