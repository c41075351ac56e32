"""`cappy sweep`: its presets and settings checks, and end to end on the session's Ray
(subprocesses, slow), with user models standing in for the paper's: a tiny local T5 folder as the
generator (FLAN-T5's code path, ``--backend hf``) and a scorer folder. Checks failed-task
isolation, rerun-computes-only-missing-or-failed, that the numbers in each task's JSON are what
evaluation gives on the scored candidates, the fused selector fitted on a held-out train
instruction, the reports, and that the same command into another folder gives the same numbers."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import REPO, tiny_t5

TASKS = ["standin_tense", "standin_rephrase"]  # stand-in tasks (tests/fake_release.py)
SMALL = ["--max-examples-per-task", "3", "--max-train-examples-per-task", "3", "--dev-examples-per-task", "1",
         "--sampling.max-new-tokens", "6", "--train-size", "16", "--schedule.batch-size", "8", "--schedule.micro-batch-size", "4",
         "--max-length", "64", "--cpus-per-task", "0.5", "--sampling.cpus-per-actor", "0.5"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny random T5 (seq2seq, like FLAN-T5) with a BPE tokenizer, a MiniLM scorer folder, and the
    stand-in tasks as a --task-dir."""
    from cappy_core.generation.embedded_model import tiny_generator
    from cappy_core.scorer.model import Scorer

    from fake_release import write_standin_tasks

    root = tmp_path_factory.mktemp("models")
    write_standin_tasks(root / "tasks")
    tiny_t5(root / "t5", tiny_generator(root / "llama"))
    Scorer.from_pretrained("minilm", seed=0).save_pretrained(root / "scorer")
    return root


def sweep(out, models, *extra, fail=None, run=subprocess.run, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("CAPPY_SWEEP_FAIL_TASKS", None)
    if fail:
        env["CAPPY_SWEEP_FAIL_TASKS"] = fail
    # the stage cache beside OUT: the test's own, shared by the sweeps of one test
    args = [sys.executable, "-m", "jobs.sweep", "--tasks", *TASKS, "--out", str(out), "--cache-dir", str(out.parent / "cache"),
            "--task-dir", str(models / "tasks"), "--generator", str(models / "t5"), "--backend", "hf", "--scorer", str(models / "scorer"), *SMALL, *extra]
    if run is subprocess.run:
        kw.update(capture_output=True, timeout=600)
    return run(args, cwd=REPO, text=True, env=env, **kw)


@pytest.mark.slow
def test_failed_task_is_recorded_and_a_rerun_computes_only_it(tmp_path, models, ray_address):
    from cappy_core.selection.evaluation import evaluate_task, mean_over_tasks, scored_groups

    out = tmp_path / "sweep"
    r1 = sweep(out, models, fail="standin_tense")
    assert r1.returncode == 1, r1.stderr[-3000:]
    tense, rephrase = (json.loads((out / "tasks" / f"{t}.json").read_text()) for t in TASKS)
    assert tense["status"] == "failed" and "injected failure" in tense["error"]
    assert rephrase["status"] == "ok"
    # one log file for the whole run under OUT/logs, the nested sampling jobs' lines included
    (log,) = out.glob("logs/sweep-*.log")
    assert r1.stdout.startswith(f"log file: {log}\n") and "-- validation split" in log.read_text()
    assert not list(out.glob("candidates/**/logs"))
    # the task's numbers are evaluation's numbers on its scored validation candidates
    scored = pq.read_table(out / "tasks" / "standin_rephrase" / "validation_scored.parquet")
    assert len(list(out.glob("candidates/sampling-*/train/standin_rephrase/train/part-00000.done.json"))) == 1
    groups, ids, _ = scored_groups(scored)
    assert len(ids) == 3 and all(len(g) == 17 for g in groups)
    assert rephrase["metrics"] == pytest.approx(evaluate_task(groups))
    assert set(rephrase["metrics"]) == {"cappy", "cappy+lm+mbr", "beam4", "sample", "temp0.9", "topk40", "topp0.95",
                                        "self_score_sum", "self_score_mean", "mbr", "oracle", "random"}
    assert rephrase["training"]["updates"] == 2 and rephrase["sizes"]["train_pairs"] == 16
    # the last sampled train instruction is dev: no finetuning pair, the fused weights are fitted on it
    assert rephrase["sizes"]["dev_instructions"] == 1 and rephrase["sizes"]["train_examples"] <= 2
    assert set(rephrase["fused_weights"]) == {"cappy", "logprob_mean", "mbr", "length"} and "cappy" in rephrase["dev_metrics"]
    dev = pq.read_table(out / "tasks" / "standin_rephrase" / "dev_scored.parquet")
    assert set(dev["example_idx"].to_pylist()) == {2} and set(dev["split"].to_pylist()) == {"train"}
    pairs = pq.read_table(out / "tasks" / "standin_rephrase" / "train_pairs.parquet")
    assert not set(pairs["instruction"].to_pylist()) & set(dev["instruction"].to_pylist())
    assert "standin_tense" in (out / "summary.md").read_text().split("Not finished")[1]

    before = (out / "tasks" / "standin_rephrase.json").read_text()
    r2 = sweep(out, models)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "1 task(s) already finished with these settings; 1 to run" in r2.stdout
    assert "sampled 0 instructions" in r2.stdout  # tense's candidates were kept from the first run
    assert (out / "tasks" / "standin_rephrase.json").read_text() == before
    records = {t: json.loads((out / "tasks" / f"{t}.json").read_text()) for t in TASKS}
    assert all(r["status"] == "ok" for r in records.values())
    # the summary is the unweighted mean over tasks, per method, rounded to 0.1
    means = mean_over_tasks({t: r["metrics"] for t, r in records.items()})
    rows = list(csv.reader((out / "summary.csv").open()))
    header, mean_row = rows[0], rows[-1]
    assert mean_row[0] == "mean" and [r[0] for r in rows[1:-1]] == TASKS
    for i, name in enumerate(header[1:-1], start=1):
        assert float(mean_row[i]) == pytest.approx(round(means[name], 1))
    assert (out / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "chart: " + str(out / "summary.png") in r2.stdout

    r3 = sweep(out, models, "--schedule.lr", "5e-5", "--sampling.seed", "1", "--schedule.seed", "1")  # other settings: both tasks are recomputed,
    assert r3.returncode == 0, r3.stderr[-3000:]                   # on candidates sampled anew for seed 1
    assert "0 task(s) already finished with these settings; 2 to run" in r3.stdout
    assert r3.stdout.count("sampled 6 instructions") == 2 and len(list(out.glob("candidates/sampling-*"))) == 2

    # the same command into a fresh folder, sampling and finetuning again (--no-cache), gives the same numbers
    other = tmp_path / "again"
    r4 = sweep(other, models, "--schedule.lr", "5e-5", "--sampling.seed", "1", "--schedule.seed", "1", "--no-cache")
    assert r4.returncode == 0, r4.stderr[-3000:]
    assert numbers(other) == numbers(out)
    assert r4.stdout.count("sampled 6 instructions") == 2 and not (other / "candidates").is_symlink()

    r5 = sweep(other, models, "--schedule.lr", "5e-5", "--sampling.seed", "1", "--schedule.seed", "1", "--finetune-scope", "all")  # one scorer for both tasks
    assert r5.returncode == 0, r5.stderr[-3000:]
    assert "0 task(s) already finished with these settings; 2 to run" in r5.stdout
    shared = json.loads((other / "tasks" / "_shared" / "training.json").read_text())
    assert shared["tasks"] == sorted(TASKS) and shared["train_pairs"] == 2 * 16 and shared["updates"] == 4
    for t in TASKS:
        r = json.loads((other / "tasks" / f"{t}.json").read_text())
        assert r["status"] == "ok" and r["training"]["scope"] == "all" and r["fused_weights"]

    # one listwise selector scorer for both tasks, finetuned before them; each task finetunes its cappy scorer
    # (kept scorers: their cards carry the validation row they pick for; live TensorBoard tracking)
    r6 = sweep(other, models, "--schedule.lr", "5e-5", "--sampling.seed", "1", "--schedule.seed", "1", "--selector-loss",
               "listwise", "--selector-scope", "all", "--keep-scorers", "--report-to", "tensorboard")
    assert r6.returncode == 0, r6.stderr[-3000:]
    assert "2 to run" in r6.stdout and "== one listwise selector scorer finetuned on all tasks" in r6.stdout
    sel = json.loads((other / "tasks" / "_shared" / "selector_training.json").read_text())
    assert sel["tasks"] == sorted(TASKS) and sel["train_pairs"] == 2 * 16 and sel["loss"] == "listwise"
    summary = json.loads((other / "summary.json").read_text())
    for t in TASKS:
        r = json.loads((other / "tasks" / f"{t}.json").read_text())
        assert r["status"] == "ok" and "scope" not in r["training"] and r["training"]["selector"] == sel
        assert "selector_score" in pq.read_table(other / "tasks" / t / "validation_scored.parquet").column_names
        assert card_results(other / "tasks" / t / "scorer") == [("cappy", t, pytest.approx(r["metrics"]["cappy"], abs=1e-4))]
        assert card_results(other / "tasks" / t / "selector_scorer") == \
            [("cappy+lm+mbr", t, pytest.approx(r["metrics"]["cappy+lm+mbr"], abs=1e-4))]
    shared = card_results(other / "tasks" / "_shared" / "selector_scorer")  # every task's fused row
    assert [(m, t) for m, t, _ in shared] == [("cappy+lm+mbr", t) for t in sorted(TASKS)]
    from test_tracking import read_tensorboard

    logged = read_tensorboard(other / "tensorboard" / "sweep")
    assert {"stages/data_s", "stages/tasks_s", "stages/report_s", "mean/cappy"} <= set(logged)
    fused = summary["intervals"]["methods"]["cappy+lm+mbr"]["mean"]
    assert logged["intervals/cappy_lm_mbr/mean/low"] == [(0, pytest.approx(fused["low"], abs=1e-4))]
    assert "summary" in image_tags(other / "tensorboard" / "sweep")  # the report's chart
    pooled = json.loads((other / "tasks" / "_shared" / "selector_scorer" / "selector.json").read_text())
    assert pooled["scope"].startswith("all tasks") and pooled["dev_instructions"] == 2  # serve's default pick

    # --zero-shot: the finished tasks are kept; each is picked by a selector finetuned on the other one only
    r7 = sweep(other, models, "--schedule.lr", "5e-5", "--sampling.seed", "1", "--schedule.seed", "1", "--selector-loss",
               "listwise", "--selector-scope", "all", "--keep-scorers", "--zero-shot")
    assert r7.returncode == 0, r7.stderr[-3000:]
    assert "0 to run" in r7.stdout and "0 task(s) already have zero-shot rows with these settings; 2 to run" in r7.stdout
    for t, other_task in zip(TASKS, reversed(TASKS)):
        pairs = pq.read_table(other / "tasks" / "_zero_shot" / t / "train_pairs.parquet")["instruction"].to_pylist()
        assert len(pairs) == 16 and all(p in other_task_instructions(other, other_task) for p in pairs)
    header = next(csv.reader((other / "summary.csv").open()))
    assert {"cappy-0shot", "fused-0shot"} <= set(header) and "Tasks the scorer never saw" in (other / "summary.md").read_text()
    zero = json.loads((other / "summary.json").read_text())["zero_shot"]
    assert set(zero) == {"beam4", "mbr"} and set(zero["mbr"]) == {"cappy-0shot", "fused-0shot"}
    table = (other / "summary.csv").read_text()
    r8 = sweep(other, models, "--schedule.lr", "5e-5", "--sampling.seed", "1", "--schedule.seed", "1", "--selector-loss",
               "listwise", "--selector-scope", "all", "--keep-scorers", "--zero-shot")
    assert "2 task(s) already have zero-shot rows with these settings; 0 to run" in r8.stdout
    assert (other / "summary.csv").read_text() == table


def other_task_instructions(out: Path, task: str) -> set[str]:
    """The instructions of ``task``'s own finetuning pairs in a sweep's OUT."""
    return set(pq.read_table(out / "tasks" / task / "train_pairs.parquet")["instruction"].to_pylist())


@pytest.mark.slow
def test_a_new_out_reuses_the_stage_cache_and_runs_only_what_changed(tmp_path, models, ray_address):
    """A second sweep into a new OUT that changes only the selector's loss: sampling and each
    task's cappy finetune come from the stage cache (the log and --dry-run say so), the selector
    scorers are finetuned, and every row that does not read the selector is unchanged. A third
    with a's settings into a new OUT trains and scores nothing and gets a's numbers; one with
    --no-cache computes everything again and gets them too."""
    a = sweep(tmp_path / "a", models)
    assert a.returncode == 0, a.stderr[-3000:]
    assert "candidates: sample into the stage cache's" in a.stdout
    dry = sweep(tmp_path / "b", models, "--selector-loss", "listwise", "--dry-run")
    assert dry.returncode == 0, dry.stderr[-3000:]
    plan_lines = dry.stdout.split("stage cache (")[1]
    assert "candidates: reuse (key sampling-" in plan_lines
    for t in TASKS:
        assert f"{t} finetune: reuse (key " in plan_lines and f"{t} selector finetune: run (because" in plan_lines
    b = sweep(tmp_path / "b", models, "--selector-loss", "listwise")
    assert b.returncode == 0, b.stderr[-3000:]
    assert "candidates: reuse the stage cache's" in b.stdout and b.stdout.count("sampled 0 instructions") == 2
    assert (tmp_path / "b" / "candidates").is_dir() and next((tmp_path / "b" / "candidates").iterdir()).is_symlink()
    from cappy_core.stage_cache import entries

    sampling = [e for e in entries(tmp_path / "cache" / "stages") if e.stage == "sampling"]
    assert len(sampling) == 1 and not sampling[0].in_use  # `cappy cache prune` sees who read it, neither running
    assert sorted(o for o, _ in sampling[0].users) == [str((tmp_path / o).resolve()) for o in ("a", "b")]
    for t in TASKS:
        ra, rb = (json.loads((tmp_path / o / "tasks" / f"{t}.json").read_text()) for o in ("a", "b"))
        key = ra["training"]["cache"].split()[1]
        assert ra["training"]["cache"].startswith("stored ") and rb["training"]["cache"] == f"reused {key}"
        assert rb["training"]["selector"]["cache"].startswith("stored ")
        # the cappy scorer's dev and validation scores are read back; the new selector's computed
        assert ra["scores_cache"] == {"reused": 0, "stored": 2} and rb["scores_cache"] == {"reused": 2, "stored": 2}
        assert f"{t}: cappy" in b.stdout and "finetune reused from the stage cache" in b.stdout
        assert {m: v for m, v in rb["metrics"].items() if m != "cappy+lm+mbr"} == \
            {m: v for m, v in ra["metrics"].items() if m != "cappy+lm+mbr"}
    again = sweep(tmp_path / "d", models, "--dry-run")  # a's settings: the estimate counts scoring only
    assert again.returncode == 0 and "2 with every finetune in the stage cache (scoring only" in again.stdout
    d = sweep(tmp_path / "d", models)  # nothing changed, a new OUT: nothing trained or scored, the same numbers
    assert d.returncode == 0, d.stderr[-3000:]
    assert "2 of 2 task finetune(s) reused (" in d.stdout and "; 4 of 4 scored table(s) reused" in d.stdout
    assert numbers(tmp_path / "d") == numbers(tmp_path / "a")
    c = sweep(tmp_path / "c", models, "--no-cache")
    assert c.returncode == 0, c.stderr[-3000:]
    assert c.stdout.count("sampled 6 instructions") == 2 and "stage cache" not in c.stdout
    assert numbers(tmp_path / "c") == numbers(tmp_path / "a")


def card_results(folder: Path) -> list[tuple]:
    """``[(method, task, Rouge-L)]`` of a kept scorer's model card (its ``model-index``)."""
    import yaml

    card = yaml.safe_load((folder / "README.md").read_text().split("---\n")[1])
    return [(r["task"]["name"].split("(")[1].rstrip(")"), r["dataset"]["config"], r["metrics"][0]["value"])
            for r in card["model-index"][0]["results"]]


def image_tags(folder: Path) -> set[str]:
    from test_tracking import tensorboard_events

    return {v.tag for event in tensorboard_events(folder) for v in event.summary.value
            if v.WhichOneof("value") == "image"}


def test_the_stage_cache_line_counts_only_what_this_run_computed():
    from cappy_core.selection.task_results import stage_cache_line

    records = {"a": {"training": {"cache": "reused k1"}, "scores_cache": {"reused": 2, "stored": 0},
                     "zero_shot": {"scores_cache": {"reused": 5, "stored": 1}}},
               "b": {"training": {"cache": "stored k2"}, "scores_cache": {"reused": 0, "stored": 2}},
               "c": {"training": {"cache": "reused k3"}, "scores_cache": {"reused": 2, "stored": 0}}}  # earlier run
    assert stage_cache_line("/c", records, ["a", "b"]) == (
        "stage cache /c: 1 of 2 task finetune(s) reused (a); 7 of 10 scored table(s) reused")


def test_push_to_hub_pushes_every_kept_scorer_and_goes_on_past_a_failure(tmp_path, monkeypatch):
    """`cappy sweep --keep-scorers --push-to-hub ORG/PREFIX`: ORG/PREFIX-<task> and
    ORG/PREFIX-<task>-selector (a stand-in HfApi: no network); one refused push is reported, the
    others still go."""
    import huggingface_hub

    from jobs.hub import push_sweep_scorers

    for task, folders in (("tense", ("scorer", "selector_scorer")), ("rephrase", ("scorer",)), ("sums", ())):
        for f in folders:
            (tmp_path / task / f).mkdir(parents=True)
            (tmp_path / task / f / "cappy.json").write_text("{}")
    uploads = []

    class FakeApi:
        def create_repo(self, repo, **kw):
            if repo == "me/cappy-rephrase":
                raise PermissionError("403: not your namespace")
            assert kw["private"] is True

        def upload_folder(self, **kw):
            uploads.append((kw["repo_id"], Path(kw["folder_path"]).relative_to(tmp_path).as_posix()))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    lines: list[str] = []
    got = push_sweep_scorers("me/cappy", tmp_path, ["tense", "rephrase", "sums"], private=True, log=lines.append)
    assert uploads == [("me/cappy-tense", "tense/scorer"), ("me/cappy-tense-selector", "tense/selector_scorer")]
    assert got == {"me/cappy-tense": "https://huggingface.co/me/cappy-tense",
                   "me/cappy-tense-selector": "https://huggingface.co/me/cappy-tense-selector",
                   "me/cappy-rephrase": "error: PermissionError: 403: not your namespace"}
    assert any("push of" in line and "me/cappy-rephrase failed" in line for line in lines)


@pytest.mark.slow
def test_ctrl_c_while_tasks_run_stops_the_sweep_at_once_and_a_rerun_keeps_the_candidates(
        tmp_path, models, ray_address):
    out = tmp_path / "sweep"
    # SIGINT as a terminal's foreground job has it (a suite started in the background of a shell without
    # job control inherits it ignored, and Python keeps it so)
    proc = sweep(out, models, run=subprocess.Popen, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                 preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline and not any(
            "== finetune, score and evaluate" in p.read_text() for p in out.glob("logs/sweep-*.log")):
        time.sleep(0.05)
    time.sleep(1)  # the Ray tasks are running
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert time.monotonic() - t0 < 20
    assert proc.returncode == 130, err[-3000:]
    assert "error: interrupted (Ctrl-C)" in err and "Traceback" not in err
    assert not (out / ".cappy.lock").exists() and not [p for p in out.rglob(".*") if ".tmp-" in p.name]
    assert not list(out.glob("tasks/*.json"))  # interrupted before a task finished: nothing half-written

    r = sweep(out, models)  # the lock was released; the candidates sampled before the interrupt are kept
    assert r.returncode == 0, r.stderr[-3000:]
    assert "0 task(s) already finished with these settings; 2 to run" in r.stdout
    assert r.stdout.count("sampled 0 instructions") == 2
    assert all(json.loads((out / "tasks" / f"{t}.json").read_text())["status"] == "ok" for t in TASKS)


def numbers(out) -> dict:
    """Every number a sweep reports (summary.json less its file paths; per task the metrics,
    per-instruction values, Spearman, fused weights, dev metrics and the training losses)."""
    summary = json.loads((out / "summary.json").read_text())
    tasks = {}
    for t in TASKS:
        r = json.loads((out / "tasks" / f"{t}.json").read_text())
        tasks[t] = {k: r[k] for k in ("metrics", "per_instruction", "spearman", "fused_weights", "dev_metrics",
                                      "sizes")}
        tasks[t]["training"] = {k: r["training"][k] for k in ("updates", "loss_first_tenth", "loss_last_tenth")}
    return {"summary": {k: v for k, v in summary.items() if not (isinstance(v, str) and str(out) in v)},
            "tasks": tasks}


@pytest.mark.slow
def test_bad_input_is_a_clear_error(tmp_path, models):
    r = sweep(tmp_path / "x", models, "--tasks", "no_such_task")
    assert r.returncode == 2 and "no_such_task" in r.stderr and "Traceback" not in r.stderr
    r = sweep(tmp_path / "x", models, "--scorer", str(tmp_path / "no_scorer"))  # refused before sampling
    assert r.returncode == 2 and "--scorer" in r.stderr and "no such folder" in r.stderr
    assert not (tmp_path / "x" / "candidates").exists()
    r = sweep(tmp_path / "x", models, "--generator", str(tmp_path / "no_gen"))
    assert r.returncode == 2 and "no_gen" in r.stderr and "Traceback" not in r.stderr
    r = sweep(tmp_path / "x", models, "--schedule.batch-size", "6")
    assert r.returncode == 2 and "multiple of --schedule.micro-batch-size" in r.stderr
    r = sweep(tmp_path / "x", models, "--schedule.loss", "listwise")
    assert r.returncode == 2 and "--schedule.group-by-instruction" in r.stderr


def test_settings_checks_and_what_defines_a_result():
    """Every setting marked as defining a result is in the key, the whole finetuning recipe with
    it; settings that cannot run are refused when the config is built, naming the setting."""
    from dataclasses import fields, replace

    from cappy_core.config import SettingError, key_values
    from cappy_core.scorer.schedule import ScorerSchedule
    from jobs.sweep_config import SweepConfig
    from jobs.sweep_layout import result_key, task_settings

    listwise = ScorerSchedule(lr=1e-4, batch_size=16, micro_batch_size=8, loss="listwise+mse",
                              group_by_instruction=True, mse_weight=0.5)
    ok = SweepConfig(schedule=listwise, dev_examples_per_task=16)
    key = result_key(ok, "gen", "init", ["a"])
    assert {f"schedule.{f.name}" for f in fields(ScorerSchedule)} <= set(key)  # a new recipe field is in it at once
    assert {"dev_examples_per_task", "finetune_scope", "selector_loss", "selector_scope", "sampling.seed",
            "sampling.decodings", "sampling.max_new_tokens"} <= set(key)
    assert not {"redo", "task_timeout_s", "cpus_per_task", "keep_scorers", "sampling.num_actors",
                "sampling.batch_size", "zero_shot"} & set(key_values(ok))
    s = task_settings(ok, Path("/tmp/out"), "init", "gen").schedule
    assert s is ok.schedule and (s.loss, s.group_by_instruction, s.mse_weight) == ("listwise+mse", True, 0.5)
    sel = task_settings(replace(ok, selector_loss="listwise"), Path("/tmp/out"), "init", "gen").selector_schedule
    assert (sel.loss, sel.group_by_instruction, sel.lr) == ("listwise", True, s.lr)  # the same finetuning otherwise
    assert task_settings(ok, Path("/tmp/out"), "init", "gen").selector_schedule is None
    for bad, setting, match in (
            (lambda: replace(listwise, group_by_instruction=False), "loss", "needs group_by_instruction"),
            (lambda: replace(ok, selector_loss="listwise", finetune_scope="all"), "selector_loss", "finetune_scope task"),
            (lambda: replace(ok, selector_scope="all"), "selector_scope", "selector_loss listwise"),
            (lambda: replace(ok, shared_torch_threads=-1), "shared_torch_threads", ">= 0"),
            (lambda: replace(ok.sampling, batch_rows=0), "batch_rows", ">= 1"),
            (lambda: replace(ok, dev_examples_per_task=40), "dev_examples_per_task", "leaves none of the 40"),
            (lambda: replace(ok, dev_examples_per_task=-1), "dev_examples_per_task", ">= 0"),
            (lambda: replace(listwise, listwise_tau=0.0), "listwise_tau", "> 0"),
            (lambda: replace(ok, push_to_hub="me/cappy"), "push_to_hub", "add --keep-scorers"),
            (lambda: replace(ok, zero_shot=True, dev_examples_per_task=0), "zero_shot", "dev_examples_per_task > 0")):
        with pytest.raises(SettingError, match=match) as e:
            bad()
        assert e.value.setting == setting
    replace(ok, finetune=False, dev_examples_per_task=40)  # nothing to finetune: no dev to leave


def test_candidates_are_kept_per_sampling_settings():
    """A changed sampling setting (or generator) samples into its own folder; other settings
    (finetuning, scoring) reuse the candidates."""
    from dataclasses import replace

    from jobs.sweep_config import SweepConfig
    from jobs.sweep_layout import task_settings

    base = SweepConfig()

    def folder(cfg, generator="/gen/a"):
        return task_settings(cfg, Path("/out"), "init", generator).candidates_dir

    assert Path(folder(base)).name.startswith("sampling-") and folder(base) == folder(replace(base))
    assert folder(replace(base, cache=False)).startswith("/out/candidates/sampling-")  # in OUT, not the cache
    assert Path(folder(replace(base, cache=False))).name == Path(folder(base)).name
    sampling = base.sampling
    changed = [replace(base, sampling=replace(sampling, seed=1)), replace(base, sampling=replace(sampling, decodings=["beam4"])),
               replace(base, sampling=replace(sampling, max_new_tokens=32)),
               replace(base, sampling=replace(sampling, samples_per_decoding=2)), replace(base, backend="hf"),
               replace(base, max_examples_per_task=8), replace(base, max_train_examples_per_task=None)]
    folders = {folder(c) for c in changed} | {folder(base, "/gen/b"), folder(base)}
    assert len(folders) == len(changed) + 2
    for same in (replace(base, schedule=replace(base.schedule, lr=1e-3)), replace(base, train_size=64),
                 replace(base, schedule=replace(base.schedule, seed=3)), replace(base, redo=True),
                 replace(base, sampling=replace(sampling, num_actors=4, batch_rows=640)),
                 replace(base, task_timeout_s=60)):
        assert folder(same) == folder(base)


def test_presets_resolve_to_the_documented_settings():
    """local: the six LOCAL_TASKS on CPU; paper: the 45 tasks, 17 candidates, the paper's finetuning."""
    from cappy_core.config import build_parser, config_from_args
    from cappy_core.data.tasks import LOCAL_TASKS
    from cappy_core.generation import PAPER_DECODING_NAMES, candidates_per_instruction, decodings_from_names
    from jobs.cli import presets
    from jobs.sweep import JOB, SweepConfig

    parser = build_parser(SweepConfig, prog="sweep", description="", presets=presets(JOB))
    assert SweepConfig().tasks == list(LOCAL_TASKS) and SweepConfig().sampling.decodings == list(PAPER_DECODING_NAMES)
    local = config_from_args(SweepConfig, parser.parse_args(["--preset", "local"]), presets(JOB))
    assert local.tasks == list(LOCAL_TASKS) and local.gpus_per_task == 0 and local.scorer is None
    assert local.dev_examples_per_task == 16 and local.schedule.loss == "mse" and local.finetune_scope == "task"
    assert local.selector_loss == "listwise"  # the fused row's own scorer; the cappy row stays MSE
    assert local.selector_scope == "all" and local.shared_torch_threads == 2  # one, on every task's pairs
    # CPU: the transformers backend in one single-thread actor per core; the paper preset keeps vLLM
    assert local.backend == "hf" and local.sampling.num_actors * local.sampling.cpus_per_actor <= 2
    # one decode per generator call: each instruction's 16 sampled rows and 4 beams
    assert local.sampling.batch_rows == local.sampling.batch_size * (16 + 4)
    paper = config_from_args(SweepConfig, parser.parse_args(["--preset", "paper", "--sampling.num-actors", "16"]), presets(JOB))
    assert paper.tasks == ["all45"] and paper.max_examples_per_task is None
    assert paper.schedule.loss == "mse" and not paper.schedule.group_by_instruction  # the paper's pointwise loss
    assert (paper.train_size, paper.schedule.lr, paper.schedule.batch_size, paper.max_length) == (102400, 2e-5, 128, 512)
    assert paper.sampling.gpus_per_actor == 1 and paper.gpus_per_task == 1 and paper.sampling.num_actors == 16
    assert paper.backend == "vllm"
    assert candidates_per_instruction(decodings_from_names(paper.sampling.decodings, paper.sampling.samples_per_decoding)) == 17


def test_the_scheduler_times_out_a_hung_task_the_others_finish_and_a_rerun_retries_it(tmp_path, ray_address):
    """The scheduler (jobs.scheduling) alone, on tasks that yield at start as the sweep's do:
    --task-timeout-s counts from when a task starts running: the hung one is cancelled and
    recorded as failed with the reason; one queued behind it is not timed while it waits; a
    task whose worker dies is recorded as failed too, and the sweep goes on."""
    import time

    import ray

    from cappy_core.io import write_json
    from cappy_core.selection.task_results import finished, key_digest, result_path, result_record
    from jobs.scheduling import wait_for_tasks

    def work(task):
        import time

        yield None
        if task == "hangs":
            time.sleep(600)
        if task == "fails":
            raise ValueError("bad task")
        if task == "dies":
            import os

            os._exit(1)  # its worker process dies mid-task
        time.sleep(2)
        yield {"value": task}

    remote = ray.remote(work).options(num_returns="streaming", max_retries=0, num_cpus=2)  # one at a time
    gens = {remote.remote(t): t for t in ("hangs", "ok", "fails", "dies")}
    t0, key = time.time(), {"k": 1}
    recs = {task: result_record(task, key, {}, get, t0) for task, get in wait_for_tasks(gens, timeout_s=3)}
    assert time.time() - t0 < 60
    assert recs["ok"]["status"] == "ok" and recs["ok"]["value"] == "ok"  # queued ~3 s, ran 2 s: not timed out
    assert recs["fails"]["status"] == "failed" and "ValueError: bad task" in recs["fails"]["error"]
    assert recs["dies"]["status"] == "failed" and "WorkerCrashedError" in recs["dies"]["error"]
    assert recs["hangs"]["status"] == "failed" and recs["hangs"]["error"] == (
        "TimeoutError: task hangs ran longer than --task-timeout-s 3 s and was cancelled (a rerun retries it)")
    for task, rec in recs.items():
        write_json(result_path(tmp_path, task), rec)
    # what a rerun computes: the failed and timed-out tasks, not the finished one
    assert {t for t in recs if finished(tmp_path, t, key_digest(key)) is None} == {"hangs", "fails", "dies"}


def test_a_task_whose_worker_dies_runs_again_within_the_sweep(tmp_path, ray_address):
    """With the sweep's --task-retries, a task whose worker process dies (SIGKILL, OOM) runs
    again from its start and its result arrives as usual; one that dies on every attempt is
    recorded as failed once its retries are used up."""
    import ray

    from cappy_core.selection.task_results import result_record
    from jobs.scheduling import wait_for_tasks

    def work(task, marker):
        import os

        yield None
        if task == "dies" or not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)  # its worker process dies mid-task
        yield {"value": task}

    remote = ray.remote(work).options(num_returns="streaming", max_retries=1, num_cpus=1)
    gens = {remote.remote(t, str(tmp_path / t)): t for t in ("dies_once", "dies")}
    recs = {task: result_record(task, {}, {}, get, 0.0) for task, get in wait_for_tasks(gens)}
    assert recs["dies_once"]["status"] == "ok" and recs["dies_once"]["value"] == "dies_once"
    assert recs["dies"]["status"] == "failed" and "WorkerCrashedError" in recs["dies"]["error"]


def test_the_sweeps_own_tasks_are_timed_retried_and_recorded(tmp_path, ray_address, monkeypatch):
    """The sweep's run_tasks with its own Ray task (sweep_task), faults injected: a hung task is
    cancelled after --task-timeout-s, a raised error and a worker that dies in every attempt are
    recorded as failed with their causes, and the Ray task runs with --task-retries as max_retries."""
    import ray

    import jobs.sweep as sw
    from jobs.sweep_layout import plan_tasks

    real, options = ray.remote, {}

    def spy(fn):  # what run_tasks asks Ray for
        remote = real(fn)

        class Spy:
            def options(self, **kw):
                options[fn.__name__] = kw
                return remote.options(**kw)
        return Spy()

    monkeypatch.setattr(ray, "remote", spy)
    for env, task in (("CAPPY_SWEEP_HANG_TASKS", "hangs"), ("CAPPY_SWEEP_FAIL_TASKS", "fails"),
                      ("CAPPY_SWEEP_DIE_TASKS", "dies")):
        monkeypatch.setenv(env, task)
    cfg = sw.SweepConfig(tasks=["hangs", "fails", "dies"], task_timeout_s=3, task_retries=1, cpus_per_task=0.5)
    plan = plan_tasks(cfg, tmp_path, cfg.tasks, "gen", "init")
    t0 = time.time()
    sw.run_tasks(cfg, plan, plan.settings, lambda _: None)
    assert time.time() - t0 < 90
    assert options["sweep_task"]["max_retries"] == 1 and options["sweep_task"]["num_cpus"] == 0.5
    recs = {t: json.loads((tmp_path / "tasks" / f"{t}.json").read_text()) for t in cfg.tasks}
    assert {r["status"] for r in recs.values()} == {"failed"} and all(r["key_digest"] == plan.digest for r in recs.values())
    assert recs["hangs"]["error"].startswith("TimeoutError: task hangs ran longer than --task-timeout-s 3 s")
    assert recs["fails"]["error"].startswith("InjectedFault: injected failure for task fails")
    assert "WorkerCrashedError" in recs["dies"]["error"]


def test_an_out_uri_is_staged_and_gets_each_task_result_as_it_arrives(tmp_path, ray_address, monkeypatch):
    """`--out memory://...` (fsspec's in-process filesystem through pyarrow, S3's code path): OUT
    is a staging folder, and each task's result is uploaded by the driver when it arrives (the
    tasks fail at once by fault injection: no model needed)."""
    import fsspec

    import jobs.sweep as sw
    from cappy_core.remote import locked_output
    from jobs.sweep_layout import checked_config, plan_tasks

    monkeypatch.setenv("CAPPY_STAGING_DIR", str(tmp_path / "staging"))
    monkeypatch.setenv("CAPPY_SWEEP_FAIL_TASKS", ",".join(TASKS))
    mem, root = fsspec.filesystem("memory"), f"/bucket/{tmp_path.name}"
    seen, sync = [], sw.sync_outputs
    monkeypatch.setattr(sw, "sync_outputs", lambda: (sync(), seen.append(sorted(mem.find(f"{root}/tasks")))))
    cfg, out = checked_config(sw.SweepConfig(tasks=TASKS, out=f"memory:/{root}", cpus_per_task=0.5))
    assert cfg.out == f"memory:/{root}" and out.parent == (tmp_path / "staging").resolve()
    with locked_output(cfg.out, "--out", "cappy sweep", log=lambda _: None) as local:
        assert Path(local).resolve() == out
        plan = plan_tasks(cfg, out, TASKS, "gen", "init")
        sw.run_tasks(cfg, plan, plan.settings, lambda _: None)
    assert [len(s) for s in seen] == [1, 2]  # one more result at the URI after each task
    assert {json.loads(mem.cat(f"{root}/tasks/{t}.json"))["status"] for t in TASKS} == {"failed"}
    with pytest.raises(ValueError, match="--out foo://x: unknown scheme foo://"):
        checked_config(sw.SweepConfig(out="foo://x"))
