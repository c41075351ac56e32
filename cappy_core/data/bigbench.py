"""BIG-Bench JSON tasks → :class:`Example` records, exactly as the Hugging Face loader makes them.

What the Hugging Face ``bigbench`` dataset script does (it calls ``bbseqio.bigbench_bridge`` with
``json_task.default_format_fn`` from the ``bigbench`` package), reproduced here without
TensorFlow:

1. Load ``task.json`` (a task with no ``examples`` is a container: its subtasks are the
   ``*/task.json`` below it, sorted by path). Drop duplicate examples (same ``json.dumps``).
2. Format each example (``default_format_fn``): multiple-choice inputs get their choices
   appended in a fixed permutation (``RandomState(42).permutation(sorted(choices))``) behind
   ``choice_prefix``; a missing ``target`` becomes the first highest-scoring choice; then
   ``input = example_input_prefix + input + example_output_prefix``.
3. Split (``bigbench_bridge``): shuffle with ``random.seed(42)``; validation is the last
   ``max(int(0.2 * n), min_validation)`` examples, train the rest. ``min_validation`` is 16, or
   ``16 // num_subtasks`` per subtask. A (sub)task with too few examples gives *no* train or
   validation split at all (the HF loader skips the split).
4. Record (HF ``_generate_examples``): ``inputs = (task_prefix + input).strip()``, targets and
   choices stripped, ``idx`` = position in the shuffled split.

Tested in ``tests/core/test_bigbench_data.py``.
"""

from __future__ import annotations

import collections
import functools
import json
import math
import random
from pathlib import Path
from typing import Any

from .records import SPLITS, Example

SPLIT_SHUFFLE_SEED = 42  # bigbench_bridge.SPLIT_SHUFFLE_SEED
FORMAT_SEED = 42  # JsonTask's random_seed, passed to default_format_fn
MIN_VALIDATION_EXAMPLES = 16

DEFAULT_INPUT_PREFIX = "\nQ: "
DEFAULT_OUTPUT_PREFIX = "\nA: "
DEFAULT_CHOICE_PREFIX = "\n  choice: "


class TaskFormatError(ValueError):
    """A task.json is malformed; the message names the file and the field."""


class TooFewExamples(ValueError):
    """A (sub)task cannot be split into train/validation (the HF loader yields no split)."""


def list_json_tasks(task_root: str | Path) -> dict[str, Path]:
    """Top-level JSON tasks under ``task_root``: ``{task name: task folder}`` (programmatic
    tasks have no task.json and are not listed)."""
    root = Path(task_root)
    if not root.is_dir():
        raise FileNotFoundError(f"task folder not found: {root}")
    return {d.name: d for d in sorted(root.iterdir()) if (d / "task.json").is_file()}


def read_task_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = json.load(f, object_pairs_hook=collections.OrderedDict)
    except json.JSONDecodeError as e:
        raise TaskFormatError(f"{path}: not valid JSON: {e}") from e
    except UnicodeDecodeError as e:
        raise TaskFormatError(f"{path}: not valid UTF-8 (byte {e.start}: {e.object[e.start:e.start + 4]!r})") from e
    if not isinstance(data, dict):
        raise TaskFormatError(f"{path}: top level must be a JSON object, got {type(data).__name__}")
    return data


def _subtask_files(task_dir: Path) -> list[Path]:
    return sorted(p / "task.json" for p in task_dir.iterdir() if (p / "task.json").is_file())


@functools.lru_cache(maxsize=None)
def _choice_permutation(n: int) -> tuple[int, ...]:
    """``RandomState(42).permutation(sorted_choices)`` depends only on the number of choices."""
    import numpy as np  # RandomState is the legacy MT19937 stream default_format_fn uses

    return tuple(int(i) for i in np.random.RandomState(seed=FORMAT_SEED).permutation(n))


def _format_example(ex: dict, data: dict, path: Path, i: int) -> tuple[str, list[str], list[str], list[float]]:
    """``default_format_fn`` + the HF record step; returns (input, targets, choices, scores)."""
    where = f"{path}: examples[{i}]"
    if not isinstance(ex, dict):
        raise TaskFormatError(f"{where}: must be an object, got {type(ex).__name__}")
    if "input" not in ex:
        raise TaskFormatError(f"{where}: missing field 'input'")
    if not isinstance(ex["input"], str):
        raise TaskFormatError(f"{where}.input: must be a string, got {type(ex['input']).__name__}")
    if "target" not in ex and "target_scores" not in ex:
        raise TaskFormatError(f"{where}: needs a 'target' or 'target_scores' field")
    text = ex["input"]
    choices: list[str] = []
    scores: list[float] = []
    target = ex.get("target")
    if "target_scores" in ex:
        ts = ex["target_scores"]
        if not isinstance(ts, dict) or not ts:
            raise TaskFormatError(f"{where}.target_scores: must be a non-empty object of choice → score")
        for k, v in ts.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise TaskFormatError(f"{where}.target_scores[{k!r}]: score must be a finite number, got {v!r}")
        if data.get("append_choices_to_input", True):
            prefix = data.get("choice_prefix", DEFAULT_CHOICE_PREFIX)
            ordered = sorted(ts.keys())
            permuted = [ordered[j] for j in _choice_permutation(len(ordered))]
            text = text + prefix + prefix.join(permuted)
        if target is None:
            hi, lo = max(ts.values()), min(ts.values())
            if (len(ts) == 1 and hi == 0) or (len(ts) > 1 and hi <= lo):
                raise TaskFormatError(f"{where}.target_scores: no correct choice (no score above the rest)")
            target = [k for k, v in ts.items() if v == hi][0]
        choices = [k.strip() for k in ts]
        scores = [float(v) for v in ts.values()]
    text = data.get("example_input_prefix", DEFAULT_INPUT_PREFIX) + text + data.get(
        "example_output_prefix", DEFAULT_OUTPUT_PREFIX)
    targets = target if isinstance(target, list) else [target]
    if not targets:  # (a blank string target is kept: BIG-Bench's own physics_questions has one)
        raise TaskFormatError(f"{where}.target: empty list; give at least one target")
    for j, t in enumerate(targets):
        if not isinstance(t, (str, int, float)) or isinstance(t, bool):
            raise TaskFormatError(f"{where}.target[{j}]: must be a string, got {t!r}")
    instruction = (str(data.get("task_prefix", "")) + text).strip()
    return instruction, [str(t).strip() for t in targets], choices, scores


def _split_subtask(
    data: dict, path: Path, task: str, subtask: str, min_validation: int
) -> dict[str, list[Example]]:
    for key in ("name", "examples"):
        if key not in data:
            raise TaskFormatError(f"{path}: missing field '{key}'")
    if not isinstance(data["examples"], list):
        raise TaskFormatError(f"{path}: field 'examples' must be a list")
    seen: set[str] = set()
    distinct = []
    for ex in data["examples"]:
        key = json.dumps(ex)
        if key not in seen:
            seen.add(key)
            distinct.append(ex)
    formatted = [_format_example(ex, data, path, i) for i, ex in enumerate(distinct)]
    random.Random(SPLIT_SHUFFLE_SEED).shuffle(formatted)  # == random.seed(42); random.shuffle
    n = len(formatted)
    n_val = max(int(0.2 * n), min_validation)
    if n_val >= n:
        raise TooFewExamples(
            f"{path}: {n} distinct examples cannot be split with at least {min_validation} for validation"
        )
    parts = {"train": formatted[: n - n_val], "validation": formatted[n - n_val:]}
    return {
        split: [
            Example(task=task, subtask=subtask, split=split, example_idx=i, instruction=ins,
                    references=refs, choices=ch, choice_scores=sc)
            for i, (ins, refs, ch, sc) in enumerate(rows)
        ]
        for split, rows in parts.items()
    }


def load_task(task_root: str | Path, task: str) -> dict[str, list[Example]]:
    """``{"train": [...], "validation": [...]}`` for one task folder under ``task_root``.

    Subtasks are concatenated in sorted order with ``subtask = "<task>:<subtask name>"``.
    Raises :class:`TooFewExamples` when the HF loader would give no split for this task, and
    :class:`TaskFormatError` (naming file and field) for malformed JSON.
    """
    task_dir = Path(task_root) / task
    path = task_dir / "task.json"
    if not path.is_file():
        raise FileNotFoundError(f"no task.json for task {task!r} in {task_dir}")
    data = read_task_json(path)
    if "examples" in data:
        return _split_subtask(data, path, task, "", MIN_VALIDATION_EXAMPLES)
    files = _subtask_files(task_dir)
    if not files:
        raise TaskFormatError(f"{path}: has neither 'examples' nor subtask folders with a task.json")
    min_val = MIN_VALIDATION_EXAMPLES // len(files)
    out: dict[str, list[Example]] = {s: [] for s in SPLITS}
    for sub_path in files:
        sub = read_task_json(sub_path)
        name = str(sub.get("name", sub_path.parent.name)).encode("ascii", errors="replace").decode()
        parts = _split_subtask(sub, sub_path, task, f"{task}:{name}", min_val)
        for s in SPLITS:
            out[s].extend(parts[s])
    return out


def task_kind(examples: list[Example]) -> str:
    """``multiple_choice`` if every example has choices, ``generative`` if none, else ``mixed``."""
    mc = sum(e.is_multiple_choice for e in examples)
    return "multiple_choice" if mc == len(examples) and mc else ("generative" if mc == 0 else "mixed")


def find_tasks(task_roots: list[str | Path]) -> dict[str, Path]:
    """``{task name: the root folder holding it}`` over several roots; later roots win, so a
    user's ``--task-dir`` can add tasks (``tellmewhy``) or replace ones from the cache."""
    found: dict[str, Path] = {}
    for root in task_roots:
        for name in list_json_tasks(root):
            found[name] = Path(root)
    return found
