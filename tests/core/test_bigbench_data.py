"""BIG-Bench loading: split sizes, formatting checked against bigbench's own code, errors."""

from __future__ import annotations

import ast
import copy
import csv
import enum
import json
import random
import textwrap

import numpy as np
import pytest

from conftest import TEST_DATA
from cappy_core.data.bigbench import TaskFormatError, TooFewExamples, find_tasks, load_task
from cappy_core.data.records import read_examples, write_examples
from cappy_core.data.tasks import GENERATIVE_45, UnknownTaskError, resolve_tasks

pytestmark = pytest.mark.bigbench


def _split_table():
    with open(TEST_DATA / "bigbench_split_sizes.csv") as f:
        return list(csv.DictReader(f))


def test_split_sizes_match_the_shared_table_for_every_task(bigbench):
    rows = _split_table()
    assert len(rows) == 44
    for row in rows:
        splits = bigbench.load(row["task"])  # vendored records or the downloaded task files
        got = (len(splits["train"]), len(splits["validation"]))
        assert got == (int(row["train"]), int(row["validation"])), row["task"]
        assert got[0] + got[1] == int(row["total"])


# --- formatting and splitting against the bigbench package's own functions -------------------

def _reference_functions(bigbench_root):
    """``default_format_fn`` (json_task.py) and ``_shuffle``/``_slice`` (bigbench_bridge.py),
    lifted out of bigbench's source with ``ast`` (the modules themselves need TensorFlow)."""
    code = bigbench_root.parent / "reference_code"
    json_task = ast.parse((code / "json_task.py").read_text())
    bridge = ast.parse((code / "bigbench_bridge.py").read_text())
    ns: dict = {"np": np, "random": random, "enum": enum, "Dict": dict, "Any": object, "List": list,
                "Mapping": dict, "Optional": object, "Tuple": tuple}
    for node in json_task.body:
        if isinstance(node, ast.FunctionDef) and node.name == "default_format_fn":
            exec(compile(ast.Module([node], []), "json_task.py", "exec"), ns)
    for node in bridge.body:
        if isinstance(node, ast.ClassDef) and node.name == "Split":
            exec(compile(ast.Module([node], []), "bigbench_bridge.py", "exec"), ns)
        if isinstance(node, ast.FunctionDef) and node.name == "get_dataset_fn":
            for inner in node.body:
                if isinstance(inner, ast.FunctionDef) and inner.name in ("_shuffle", "_slice"):
                    src = textwrap.dedent(ast.unparse(inner))
                    exec(src, ns)
    return ns


def _reference_records(ns, data, min_validation, task_name="t", subtask_name=None):
    """bigbench_bridge's dataset_fn + the HF loader's record step, with bigbench's functions."""
    seen, distinct = set(), []
    for ex in data["examples"]:
        key = json.dumps(ex)
        if key not in seen:
            seen.add(key)
            distinct.append(ex)
    prefixes = dict(
        input_prefix=data.get("example_input_prefix", "\nQ: "),
        output_prefix=data.get("example_output_prefix", "\nA: "),
        choice_prefix=data.get("choice_prefix", "\n  choice: "),
        append_choices_to_input=data.get("append_choices_to_input", True),
    )
    ds = [ns["default_format_fn"](copy.deepcopy(ex), random_seed=42, **prefixes) for ex in distinct]
    ds = ns["_shuffle"](ds, shuffle_seed=42)
    ns.update(task_name=task_name, subtask_name=subtask_name, min_validation_examples=min_validation)
    out = {}
    for split in ("train", "validation"):
        _, part = ns["_slice"](list(ds), ns["Split"].from_str(split), max_num_examples=None)
        out[split] = [
            ((data.get("task_prefix", "") + ex["input"]).strip(), [t.strip() for t in ex["target"]],
             [k.strip() for k in ex.get("target_scores", {})], [float(v) for v in ex.get("target_scores", {}).values()])
            for ex in part
        ]
    return out


@pytest.mark.parametrize("task", [
    "tense", "word_sorting", "auto_debugging", "simple_text_editing", "repeat_copy_logic",
    "analytic_entailment", "anachronisms", "crash_blossom", "logical_sequence", "sufficient_information",
    "known_unknowns", "persian_idioms", "hyperbaton",
])
def test_formatting_and_split_equal_bigbench_reference_code(bigbench_root, task):
    from cappy_core.data.bigbench import read_task_json

    ns = _reference_functions(bigbench_root)
    data = read_task_json(bigbench_root / task / "task.json")
    want = _reference_records(ns, data, 16, task)
    got = load_task(bigbench_root, task)
    for split in ("train", "validation"):
        mine = [(e.instruction, e.references, e.choices, e.choice_scores) for e in got[split]]
        assert mine == want[split], (task, split)
        assert [e.example_idx for e in got[split]] == list(range(len(mine)))


def test_subtasks_use_the_per_subtask_minimum_and_reference_order(bigbench_root):
    from cappy_core.data.bigbench import read_task_json

    ns = _reference_functions(bigbench_root)
    got = load_task(bigbench_root, "gem")
    subdirs = sorted(p for p in (bigbench_root / "gem").iterdir() if (p / "task.json").is_file())
    assert len(subdirs) == 13
    want = {"train": [], "validation": []}
    for d in subdirs:
        part = _reference_records(ns, read_task_json(d / "task.json"), 16 // 13, "gem", d.name)
        for s in want:
            want[s].extend(part[s])
    for s in want:
        assert [(e.instruction, e.references) for e in got[s]] == [(w[0], w[1]) for w in want[s]]
    assert {e.subtask for e in got["train"]} == {f"gem:{read_task_json(d / 'task.json')['name']}" for d in subdirs}


def test_multiple_choice_record_fields(bigbench):
    ex = bigbench.load("known_unknowns")["validation"][0]
    assert ex.task == "known_unknowns" and ex.subtask == "" and ex.split == "validation"
    assert ex.choices and len(ex.choices) == len(ex.choice_scores)
    assert ex.references[0] in ex.choices  # the target is the highest-scoring choice
    assert max(ex.choice_scores) == 1.0
    assert "choice: " in ex.instruction  # choices appended to the input


# --- task sets ---------------------------------------------------------------------------------

def test_task_sets(bigbench_root):
    available = find_tasks([bigbench_root])
    assert len(GENERATIVE_45) == 45
    names, unavailable = resolve_tasks(["all45"], available)
    assert len(names) == 44 and "tellmewhy" not in names
    assert set(unavailable) == {"tellmewhy"} and "--task-dir" in unavailable["tellmewhy"]
    pretrain, _ = resolve_tasks(["pretrain"], available)
    assert not set(pretrain) & set(GENERATIVE_45)
    assert len(pretrain) + 44 == len(available)
    with pytest.raises(UnknownTaskError, match="word_sorting"):
        resolve_tasks(["wordsorting"], available)


def test_task_dir_adds_a_task(tmp_path):
    task = {
        "canary": "x", "name": "tellmewhy", "description": "d", "keywords": [], "metrics": ["rouge"],
        "preferred_score": "rougeLsum",
        "examples": [{"input": f"why {i}?", "target": [f"because {i}", f"as {i}"]} for i in range(40)],
    }
    (tmp_path / "tellmewhy").mkdir()
    (tmp_path / "tellmewhy" / "task.json").write_text(json.dumps(task))
    from cappy_core.data.cache import BigBenchNotFound
    from cappy_core.data.catalog import TaskCatalog

    catalog = TaskCatalog.open(tmp_path / "empty_cache", [tmp_path])
    assert catalog.resolve(["tellmewhy"]) == (["tellmewhy"], {})
    assert catalog.source("tellmewhy") == f"task-dir: {tmp_path}"
    names, unavailable = catalog.resolve(["all45"], require=False)
    assert "tellmewhy" in names and not unavailable
    # the other 44 are known but not on this machine: named, with how to get them; a typo is unknown
    with pytest.raises(BigBenchNotFound, match=r"not on this machine: .*and 36 more\. `cappy data download`"):
        catalog.resolve(["all45"])
    with pytest.raises(UnknownTaskError, match="unknown task 'tellmewhyy'.*tellmewhy"):
        catalog.resolve(["tellmewhyy"])
    splits = catalog.load("tellmewhy")
    assert (len(splits["train"]), len(splits["validation"])) == (24, 16)
    assert splits["train"][0].instruction.startswith("Q: why")
    assert splits["train"][0].instruction.endswith("A:")


# --- bad input -----------------------------------------------------------------------------------

def _write_task(tmp_path, examples, name="bad"):
    d = tmp_path / name
    d.mkdir(exist_ok=True)
    (d / "task.json").write_text(json.dumps({"name": name, "examples": examples}))
    return d / "task.json"


@pytest.mark.parametrize("examples,field", [
    ([{"input": "a"}] * 1, "needs a 'target' or 'target_scores'"),
    ([{"target": "a"}], "missing field 'input'"),
    ([{"input": 3, "target": "a"}], "examples[0].input"),
    ([{"input": "a", "target_scores": {"x": 0, "y": 0}}], "examples[0].target_scores: no correct choice"),
    ([{"input": "a", "target_scores": {"x": "high"}}], "target_scores['x']"),
    ([{"input": "a", "target_scores": {"x": 1, "y": float("nan")}}], "examples[0].target_scores['y']: score must be "
                                                                    "a finite number, got nan"),
    ([{"input": "a", "target": "b"}, {"input": "c", "target_scores": {"x": float("inf")}}],
     "examples[1].target_scores['x']: score must be a finite number, got inf"),
    ([{"input": "a", "target": []}], "examples[0].target: empty list"),
    (["not an object"], "examples[0]: must be an object"),
])
def test_malformed_task_names_file_and_field(tmp_path, examples, field):
    path = _write_task(tmp_path, examples)
    with pytest.raises(TaskFormatError) as err:
        load_task(tmp_path, "bad")
    assert str(path) in str(err.value) and field in str(err.value)


def test_invalid_json_and_too_few_examples(tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "task.json").write_text("{not json")
    with pytest.raises(TaskFormatError, match="broken/task.json: not valid JSON"):
        load_task(tmp_path, "broken")
    (tmp_path / "latin1").mkdir()
    (tmp_path / "latin1" / "task.json").write_bytes(b'{"examples": [{"input": "caf\xe9", "target": "x"}]}')
    with pytest.raises(TaskFormatError, match=r"latin1/task.json: not valid UTF-8 \(byte 28"):
        load_task(tmp_path, "latin1")
    _write_task(tmp_path, [{"input": f"q{i}", "target": "a"} for i in range(16)], name="small")
    with pytest.raises(TooFewExamples, match="16 distinct examples"):
        load_task(tmp_path, "small")


def test_parquet_round_trip(tmp_path, bigbench):
    examples = bigbench.load("anachronisms")["train"][:50]
    path = write_examples(examples, tmp_path / "a" / "train.parquet")
    assert read_examples(path) == examples
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["train.parquet"]  # no temporary left
    (tmp_path / "a" / ".train.tmp-1-dead.parquet").write_text("a crashed write")
    assert read_examples(tmp_path / "a") == examples  # a folder read skips hidden files
    (tmp_path / "junk.parquet").write_text("nope")
    with pytest.raises(ValueError, match="junk.parquet"):
        read_examples(tmp_path / "junk.parquet")


