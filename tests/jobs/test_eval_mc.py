"""``cappy eval-mc``: the accuracy pipeline on hand-made examples, the held-out checks
(``cappy_core.selection.classification``), and the command on one real multiple-choice task."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field

import pytest

from cappy_core.selection.classification import check_tasks, trained_tasks
from cappy_core.config import ConfigError
from cappy_core.selection.evaluation import chance_accuracy, classification_accuracy, score_choices
from conftest import REPO
from jobs import eval_mc


@dataclass
class Ex:
    instruction: str
    choices: list[str]
    choice_scores: list[float] = field(default_factory=list)
    task: str = "toy"


class LengthScorer:
    """Scores a pair by the response's length; records every call."""

    def __init__(self):
        self.calls: list[tuple[list[str], list[str], dict]] = []

    def score(self, instructions, responses, **kwargs):
        self.calls.append((list(instructions), list(responses), kwargs))
        return [float(len(r)) for r in responses]


TOY = [
    Ex("Q1", ["a", "bbb", "cc"], [0.0, 1.0, 0.0]),          # longest = correct
    Ex("Q2", ["dddd", "e"], [0.0, 1.0]),                     # longest = wrong
    Ex("Q3", ["ff", "gg", "h"], [1.0, 0.0, 0.0]),            # tie -> first -> correct
    Ex("Q4", ["iii", "jjj", "k", "l"], [1.0, 1.0, 0.0, 0.0]),  # two correct; pick 0 -> correct
]


@pytest.mark.parametrize("chunk", [1, 3, 1024])
def test_score_choices_aligns_scores_with_choices_and_gives_exact_accuracy(chunk):
    scorer, done = LengthScorer(), []
    scores = score_choices(scorer, TOY, chunk_pairs=chunk, progress=done.append, max_tokens=7)
    assert scores == [[1.0, 3.0, 2.0], [4.0, 1.0], [2.0, 2.0, 1.0], [3.0, 3.0, 1.0, 1.0]]
    assert sum(done) == 12 and len(scorer.calls) == -(-12 // chunk)
    pairs = [(i, r) for c in scorer.calls for i, r in zip(c[0], c[1])]
    assert pairs[:3] == [("Q1", "a"), ("Q1", "bbb"), ("Q1", "cc")] and pairs[-1] == ("Q4", "l")
    assert all(c[2] == {"max_tokens": 7} for c in scorer.calls)
    gold = [e.choice_scores for e in TOY]
    assert classification_accuracy(gold, scores) == 0.75
    assert chance_accuracy(gold) == pytest.approx((1 / 3 + 1 / 2 + 1 / 3 + 2 / 4) / 4)


def test_score_choices_refuses_an_example_without_choices():
    with pytest.raises(ValueError, match="example 1 of task 'toy' has no answer choices"):
        score_choices(LengthScorer(), [TOY[0], Ex("Q", [])])


def _scorer_folder(path, config=None, run=None):
    """A folder that passes resolve_source, with the records the train jobs write."""
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"")
    if config is not None:
        (path / "results.json").write_text(json.dumps({"job": "pretrain", "config": config}))
    if run is not None:
        (path / "cappy.json").write_text(json.dumps({"metadata": {"run": run}}))
    return path


def test_trained_tasks_reads_results_cappy_json_and_follows_init(tmp_path):
    available = ["implicatures", "ruin_names", "snarks", "gem"]
    pre = _scorer_folder(tmp_path / "pre", {"tasks": ["snarks", "implicatures"], "init": "minilm"})
    fine = _scorer_folder(tmp_path / "fine", {"task": "gem", "init": str(pre)}, run={"task": "gem"})
    assert trained_tasks(str(pre), available) == ({"snarks", "implicatures"}, [])
    assert trained_tasks(str(fine), available) == ({"gem", "snarks", "implicatures"}, [])
    everything = _scorer_folder(tmp_path / "all", run={"tasks": ["pretrain"]})
    assert trained_tasks(str(everything), available) == ({"implicatures", "ruin_names", "snarks"}, [])
    assert trained_tasks("minilm", available) == (set(), [])
    bare = _scorer_folder(tmp_path / "bare")
    assert trained_tasks(str(bare), available) == (set(), [str(bare)])
    assert trained_tasks("btan2/cappy-large", available) == (set(), ["btan2/cappy-large"])


def test_check_tasks_refuses_seen_generative_unknown_and_task_sets():
    available = ["implicatures", "ruin_names", "gem"]
    assert check_tasks(["ruin_names", "implicatures", "ruin_names"], available) == \
        ["ruin_names", "implicatures"]
    with pytest.raises(ConfigError, match="'implicatures' is in the training data of scorer 'S'"):
        check_tasks(["ruin_names", "implicatures"], available, {"S": {"implicatures"}})
    warned = []
    assert check_tasks(["implicatures"], available, {"S": {"implicatures"}}, allow_seen=True,
                       warn=warned.append) == ["implicatures"]
    assert len(warned) == 1 and "implicatures" in warned[0]
    with pytest.raises(ConfigError, match="'gem' is one of the 45 generative"):
        check_tasks(["gem"], available)
    with pytest.raises(ConfigError, match="unknown task 'implicature'.*implicatures"):
        check_tasks(["implicature"], available)
    with pytest.raises(ConfigError, match="not the task set 'pretrain'"):
        check_tasks(["pretrain"], available)


def _error(capsys, *argv):
    rc = eval_mc.main(list(argv), prog="cappy eval-mc")
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and err.splitlines()[-1].startswith("error: ")
    return err


@pytest.mark.bigbench
def test_cli_errors_name_the_task(bigbench_root, tmp_path, capsys):
    assert "'gem' is one of the 45 generative" in _error(capsys, "--tasks", "implicatures", "gem")
    assert "unknown task 'implicaturez'" in _error(capsys, "--tasks", "implicaturez")
    err = _error(capsys, "--tasks", "simple_arithmetic_json_subtasks")
    assert "'simple_arithmetic_json_subtasks' has no multiple-choice examples" in err
    pre = _scorer_folder(tmp_path / "pretrain-local" / "scorer",
                         {"tasks": ["snarks", "ruin_names"], "init": "minilm"})
    err = _error(capsys, "--tasks", "implicatures", "ruin_names", "--scorers", "minilm", str(pre))
    assert "task 'ruin_names' is in the training data of scorer" in err and "--allow-seen-tasks" in err
    assert "no tasks" in _error(capsys)
    assert "not found" in _error(capsys, "--tasks", "implicatures", "--scorers", str(tmp_path / "missing"))


def test_cli_runs_on_a_task_folder_and_writes_json(standin_tasks, tmp_path):
    out = tmp_path / "mc.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "jobs.cli", "eval-mc", "--tasks", "standin_colors",
                        "--task-dir", str(standin_tasks), "--max-examples", "8", "--out", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].split() == ["task", "examples", "choices", "chance", "minilm"]
    row = next(line.split() for line in lines if line.startswith("standin_colors"))
    assert row[1:4] == ["8", "3.00", "33.3"]
    assert next(line for line in lines if line.startswith("mean")).split()[1:4] == ["8", "3.00", "33.3"]
    res = json.loads(out.read_text())
    (task,) = res["tasks"]
    assert task["task"] == "standin_colors" and task["examples"] == 8 and task["chance"] == pytest.approx(1 / 3)
    acc = task["accuracy"]["minilm"]
    assert acc * 8 == round(acc * 8) and float(row[4]) == pytest.approx(100 * acc, abs=0.05)
    assert res["mean"]["accuracy"]["minilm"] == acc and res["scorers"] == [{"label": "minilm", "source": "minilm"}]
