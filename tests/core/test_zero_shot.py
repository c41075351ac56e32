"""Selection on tasks the scorer never saw (cappy_core.selection.zero_shot): the leave-one-task-out
finetune sees no pair of the held-out task, its fused weights come from the other tasks' dev
instructions only, the held-out task is picked the way serve picks, the rows merge into the
task's record aligned by instruction, and the endpoint's pooled weights land in the shared scorer.
Small synthetic tasks on disk (test_task_eval's), a fake finetune and a label-reading scorer."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from test_task_eval import LabelScorer, TextScorer, make_task

from cappy_core.selection.evaluation import CAPPY_0SHOT, FUSED_0SHOT, best_baseline
from cappy_core.selection.selectors import fused_for_candidates, read_selector
from cappy_core.selection.task_eval import TaskSettings
from cappy_core.selection.zero_shot import (fit_pooled_selector, merge_zero_shot, pick_rows, run_zero_shot,
                                            with_zero_shot)
from cappy_core.scorer.training import ScorerSchedule

TASKS = ["a", "b", "c"]


class Saved(LabelScorer):
    """The label scorer, savable as a folder (what a finetune leaves)."""

    def save_pretrained(self, folder, metadata=None):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "config.json").write_text("{}")


@pytest.fixture()
def sweep_dirs(tmp_path, monkeypatch):
    """Three tasks' data and candidates, a finetune that records the pairs it is given and returns
    the label scorer, and ``Scorer.from_pretrained`` returning it too."""
    import cappy_core.selection.task_eval as te

    for task in TASKS:
        data, cands = make_task(tmp_path, task)
    seen: list[list[str]] = []

    def fake_finetune(init, pairs_file, schedule, **kw):
        seen.append(pq.read_table(pairs_file)["instruction"].to_pylist())
        return Saved(cands), {"updates": 1, "samples_per_s": 1.0}

    monkeypatch.setattr(te, "finetune", fake_finetune)
    monkeypatch.setattr("cappy_core.scorer.model.Scorer.from_pretrained", lambda folder, **kw: Saved(cands))
    settings = TaskSettings(data_dir=data, candidates_dir=cands, tasks_dir=str(tmp_path / "tasks"), init="x",
                            max_length=32, schedule=ScorerSchedule(seed=0), train_size=16, dev_examples=3,
                            selector_schedule=ScorerSchedule(seed=0, loss="listwise", group_by_instruction=True))
    return settings, seen


def test_the_held_out_task_gives_no_pair_and_no_weight(sweep_dirs):
    settings, seen = sweep_dirs
    result = run_zero_shot("a", TASKS, settings, "digest-1")
    (pairs,) = seen
    assert {i.split()[0] for i in pairs} == {"b", "c"} and len(pairs) == 2 * 16  # the others' pairs only
    assert result["fit"]["tasks"] == ["b", "c"] and result["fit"]["dev_instructions"] == 2 * 3
    folder = Path(settings.tasks_dir) / "_zero_shot" / "a" / "scorer"
    assert read_selector(folder) == result["weights"]
    # a's 4 validation and 3 dev instructions, each picked; the label scorer's pick is the oracle's (90)
    assert len(result["validation"]) == 4 and len(result["dev"]) == 3
    assert all(v[CAPPY_0SHOT] == pytest.approx(90.0) for v in result["validation"].values())
    assert json.loads((folder.parent / "result.json").read_text())["sweep_digest"] == "digest-1"
    run_zero_shot("a", TASKS, settings, "digest-1")  # the same settings: the finetune is kept
    assert len(seen) == 1


def test_the_held_out_tasks_labels_change_no_weight(sweep_dirs, tmp_path):
    """The fused weights are fitted on b and c: rewriting a's labels on disk (train and validation)
    leaves them and the finetune's pairs as they were."""
    import pyarrow as pa

    settings, seen = sweep_dirs
    first = run_zero_shot("a", TASKS, settings, "digest-1")
    for path in Path(settings.candidates_dir).glob("*/a/**/*.parquet"):
        t = pq.read_table(path)
        pq.write_table(t.set_column(t.schema.get_field_index("label"), "label",
                                    pa.array([1.0 - x for x in t["label"].to_pylist()], t.schema.field("label").type)),
                       path)
    again = run_zero_shot("a", TASKS, settings, "digest-2")  # another digest: finetuned again
    assert again["weights"] == first["weights"] and again["fit"] == first["fit"] and seen[0] == seen[1]


def test_picks_are_serves_picks():
    """The fused row is fused_for_candidates' argmax with the weights, ties to the first candidate."""
    import pyarrow as pa

    rows = {"instruction_id": ["i1"] * 3 + ["i2"] * 2, "text": ["x y", "x y z", "q", "a", "a"],
            "label": [0.2, 0.7, 0.4, 0.5, 0.9], "score": [0.1, 0.3, 0.9, 1.0, 1.0],
            "logprob_mean": [-1.0, -0.1, -3.0, -1.0, -1.0]}
    weights = {"cappy": 1.0, "logprob_mean": 2.0, "mbr": 1.0}
    got = pick_rows(pa.table(rows), weights)
    fused = fused_for_candidates(rows["score"][:3], rows["logprob_mean"][:3], rows["text"][:3], weights)
    assert got["i1"] == {CAPPY_0SHOT: pytest.approx(40.0), FUSED_0SHOT: pytest.approx(100 * rows["label"][fused.argmax()])}
    assert got["i2"] == {CAPPY_0SHOT: pytest.approx(50.0), FUSED_0SHOT: pytest.approx(50.0)}  # ties: the first
    nan = pa.table({**rows, "label": [0.2, float("nan"), 0.4, 0.5, 0.9]})
    assert set(pick_rows(nan, weights)) == {"i2"}  # an instruction without references grades nothing


def test_rows_merge_by_instruction_and_never_become_the_baseline(tmp_path):
    record = {"task": "a", "status": "ok", "key_digest": "d", "instruction_ids": ["i2", "i1"],
              "metrics": {"beam4": 30.0, "mbr": 40.0}, "per_instruction": {"beam4": [20.0, 40.0], "mbr": [40.0, 40.0]}}
    zero = {"sweep_digest": "d", "weights": {"mbr": 1.0}, "fit": {}, "validation": {
        "i1": {CAPPY_0SHOT: 10.0, FUSED_0SHOT: 90.0}, "i2": {CAPPY_0SHOT: 30.0, FUSED_0SHOT: 70.0}}}
    merged = merge_zero_shot(record, zero)
    assert merged["per_instruction"][CAPPY_0SHOT] == [30.0, 10.0] and merged["metrics"][FUSED_0SHOT] == 80.0
    assert best_baseline(merged["metrics"]) == ("mbr", 40.0) and "zero_shot" in merged
    with pytest.raises(ValueError, match="1 validation instruction"):
        merge_zero_shot({**record, "instruction_ids": ["i1", "i3"]}, zero)
    # with_zero_shot merges only a result recorded with the record's settings
    home = tmp_path / "_zero_shot" / "a"
    home.mkdir(parents=True)
    (home / "result.json").write_text(json.dumps(zero))
    assert CAPPY_0SHOT in with_zero_shot(tmp_path, {"a": record})["a"]["metrics"]
    (home / "result.json").write_text(json.dumps({**zero, "sweep_digest": "other"}))
    assert with_zero_shot(tmp_path, {"a": record})["a"] == record
    (home / "result.json").write_text("{")  # a broken file: an error naming it, not a silent gap
    with pytest.raises(ValueError, match="result.json: not a zero-shot result"):
        with_zero_shot(tmp_path, {"a": record})


def test_a_broken_task_record_is_an_error_naming_it(tmp_path):
    from cappy_core.selection.task_results import read_result

    assert read_result(tmp_path, "a")["status"] == "missing"
    for text in ("", "[1]"):
        (tmp_path / "a.json").write_text(text)
        with pytest.raises(ValueError, match="a.json: not a task result record"):
            read_result(tmp_path, "a")


def test_the_endpoints_default_weights_are_fitted_on_every_tasks_dev(tmp_path, monkeypatch):
    """fit_pooled_selector: the shared selector scorer gets the weights that pick best on all
    tasks' dev instructions pooled, read from its ``selector_score`` column."""
    from cappy_core.selection.scored_tables import SELECTOR_SCORE, add_mbr, score_table
    from cappy_core.selection.zero_shot import dev_candidates

    for task in TASKS:
        data, cands = make_task(tmp_path, task)
    settings = TaskSettings(data_dir=data, candidates_dir=cands, tasks_dir=str(tmp_path / "tasks"), init="x",
                            max_length=32, dev_examples=3)
    assert fit_pooled_selector(settings.tasks_dir, TASKS) is None  # no shared scorer
    shared = tmp_path / "tasks" / "_shared" / "selector_scorer"
    shared.mkdir(parents=True)
    (shared / "config.json").write_text("{}")
    for task in TASKS:  # the tasks' dev tables: a wrong scorer's score, the right one as selector_score
        t = score_table(TextScorer(), dev_candidates(task, settings))
        t = add_mbr(score_table(LabelScorer(cands), t, SELECTOR_SCORE))
        (tmp_path / "tasks" / task).mkdir(parents=True, exist_ok=True)
        pq.write_table(t, tmp_path / "tasks" / task / "dev_scored.parquet")
    got = fit_pooled_selector(settings.tasks_dir, TASKS)
    assert got["dev_instructions"] == 9 and got["dev_rouge"] == pytest.approx(90.0)  # the oracle: selector_score
    stored = json.loads((shared / "selector.json").read_text())
    assert stored["weights"] == got["weights"] and stored["tasks"] == 3 and read_selector(shared) == got["weights"]
