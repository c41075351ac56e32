"""Labelled-pair mixtures for scorer training: task examples (+ sampled candidates) → pairs.

One builder, :func:`build_pair_mixture`, serves both jobs:

* **pretraining** (``jobs/pretrain.py``): BIG-Bench tasks *not* among the 45 evaluation tasks,
  capped per task;
* **finetuning** (``jobs/finetune.py``): one task's train split, uncapped.

Labels
------
* A **multiple-choice** example gives exact labels: every choice whose ``choice_scores`` value
  equals the example's maximum → 1.0, every other choice → 0.0 (``source="choice"``); with
  ``max_wrong_choices=k`` only k wrong choices (a seeded random sample) are kept, so an example
  with 118 choices (``periodic_elements``) does not flood the mixture with negatives. An example
  whose choices all score the same says nothing about which is right and is skipped.
* A **generative** example goes through :func:`cappy_core.labeling.rouge.build_training_pairs` with
  the other generative examples of its task: references → 1.0, one random other example's
  reference per positive → 0.0, and its sampled candidates with their Rouge-L labels.
* **Sampled candidates** (optional, any example kind) come from the sample+label job's Parquet
  files (:func:`read_samples`); a candidate equal to a choice/reference/negative keeps the
  earlier, exact label.

Mixture rules (all seeded; same inputs and seed → same output)
---------------------------------------------------------------
1. **Per-task cap** (``max_pairs_per_task``): a task's pairs are grouped by instruction; the
   instructions are shuffled and taken *whole* (all pairs of an instruction or none) until the
   next one would push the task past the cap (the first is always taken). So a task with 100k
   examples contributes about as much as the cap, and a small task everything it has.
2. **Held-out eval slice by instruction** (``eval_size``): the distinct instructions of the
   mixture are shuffled and moved, whole, to the eval slice until it holds at least
   ``eval_size`` pairs; no instruction appears in both slices. At least one instruction always
   stays in train.
3. **Train**: shuffled, then cut or tiled to ``train_size`` (the shuffled list repeated, as
   ``build_training_pairs`` does). The eval slice is shuffled, never tiled.

Sample files (written by the sampling job; one row per sampled candidate)
-------------------------------------------------------------------------
| column      | type    | meaning                                                        |
|-------------|---------|----------------------------------------------------------------|
| task        | string  | task of the example                                             |
| subtask     | string  | its subtask (``""`` if none)           } the example's key:     |
| split       | string  | ``train`` / ``validation``             } (task, subtask, split, |
| example_idx | int64   | index within (task, subtask, split)    }  example_idx)          |
| instruction | string  | the example's instruction (the fallback key, with ``task``)     |
| text        | string  | the sampled candidate                                           |
| label       | float64 | its Rouge-L F1 against the references, in [0, 1] (null: none)   |
| decoding, sample_idx | | which decoding config / sample (not needed here)              |

This is the layout ``cappy sample`` writes (:mod:`cappy_core.labeling.candidates`; of its folder only the
shards with a completion record are read); any folder of Parquet files with these columns works.
Rows are matched to examples by (task, subtask, split, example_idx) when a file has those
columns, else by (task, instruction). A null label (an example without references) is skipped;
a label outside [0, 1] or NaN is an error naming the file and the row.

Examples come from a ``cappy data prepare`` folder or straight from the task catalog (vendored, cached)
(:func:`load_examples`). Pairs are written and read as Parquet by :mod:`cappy_core.labeling.pair_files`
(:func:`write_pairs`, :func:`read_pairs`, :func:`check_pair_file`, :func:`read_pair_columns`,
:func:`write_pair_files`, :func:`existing_pair_files`); those names are importable from here too.

Tested in ``tests/core/test_pretrain_data.py``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from cappy_core.data.records import Example
from cappy_core.labeling.rouge import LabeledPair, build_training_pairs
from cappy_core.labeling.pair_files import (LabelError, check_labels, check_pair_file, existing_pair_files, labels_array,
                                   parquet_files, parquet_schema, read_pair_columns, read_pairs,
                                   read_parquet_columns, write_pair_files, write_pairs)

__all__ = [
    "LabelError", "CandidateIndex", "sample_files", "read_samples", "example_pairs", "cap_per_task",
    "split_by_instruction", "tile", "build_pair_mixture", "write_pairs", "read_pairs",
    "check_pair_file", "check_labels", "read_pair_columns", "parquet_files", "SAMPLE_KEY_COLUMNS",
    "load_examples", "write_pair_files", "existing_pair_files",
]

SAMPLE_KEY_COLUMNS = ("task", "subtask", "split", "example_idx")


# --- sampled candidates ----------------------------------------------------------------------

@dataclass
class CandidateIndex:
    """Sampled, labelled candidates looked up per example (see the module docstring)."""

    by_key: dict[tuple[str, str, str, int], list[tuple[str, float]]] = field(default_factory=dict)
    by_instruction: dict[tuple[str, str], list[tuple[str, float]]] = field(default_factory=dict)

    def __len__(self) -> int:
        return sum(map(len, self.by_key.values())) + sum(map(len, self.by_instruction.values()))

    def add(self, task: str, instruction: str, text: str, label: float,
            key: tuple[str, str, int] | None = None) -> None:
        if key is not None:
            self.by_key.setdefault((task, *key), []).append((text, float(label)))
        else:
            self.by_instruction.setdefault((task, instruction), []).append((text, float(label)))

    def for_example(self, ex: Example) -> list[tuple[str, float]]:
        found = self.by_key.get((ex.task, ex.subtask, ex.split, int(ex.example_idx)))
        if found is None:
            found = self.by_instruction.get((ex.task, ex.instruction), [])
        return found


def sample_files(path: str | Path, tasks: Iterable[str] | None = None,
                 splits: Iterable[str] | None = None) -> list[Path]:
    """The sample Parquet files under ``path``: for a ``cappy sample`` output folder, its
    *completed* shards (:func:`cappy_core.labeling.candidates.candidate_files`); for any other folder,
    every ``*.parquet`` in it (recursively); a file is itself."""
    from cappy_core.labeling.candidates import candidate_files

    p = Path(path).expanduser()
    if p.is_dir():
        done = candidate_files(p, None if tasks is None else set(tasks), None if splits is None else set(splits))
        if done or any(p.glob("*/*/part-*.done.json")):
            return done
    return parquet_files(p)


def read_samples(path: str | Path, *, tasks: Iterable[str] | None = None,
                 splits: Iterable[str] | None = None) -> CandidateIndex:
    """Index the sample+label Parquet under ``path`` (:func:`sample_files`), keeping rows of
    ``tasks`` / ``splits`` when given. Rows with a null label (examples without references) are
    skipped; a NaN label or one outside [0, 1] is a :class:`LabelError` naming file and row."""
    keep_tasks = set(tasks) if tasks is not None else None
    keep_splits = set(splits) if splits is not None else None
    index = CandidateIndex()
    for f in sample_files(path, keep_tasks, keep_splits):
        names = parquet_schema(f).names
        keyed = all(c in names for c in SAMPLE_KEY_COLUMNS)
        cols = ["task", "instruction", "text", "label"] + (list(SAMPLE_KEY_COLUMNS[1:]) if keyed else [])
        table = read_parquet_columns(f, cols)
        label_col = table.column("label")
        null = np.asarray(label_col.is_null().to_numpy(zero_copy_only=False), dtype=bool)
        check_labels(labels_array(label_col), str(f), skip=null)
        rows = table.to_pydict()
        for i in range(len(rows["label"])):
            task = rows["task"][i]
            if null[i] or (keep_tasks is not None and task not in keep_tasks):
                continue
            if keyed and keep_splits is not None and rows["split"][i] not in keep_splits:
                continue
            text = rows["text"][i]
            if text is None or task is None:
                raise ValueError(f"{f}: row {i} (0-based): null task or text")
            key = (rows["subtask"][i] or "", rows["split"][i], int(rows["example_idx"][i])) if keyed else None
            index.add(task, rows["instruction"][i], text, rows["label"][i], key)
    return index


# --- examples --------------------------------------------------------------------------------

def load_examples(tasks: Sequence[str], splits: Sequence[str], examples_dir: str | None,
                  cache_dir: str | None, log: Callable[[str], None] = print) -> tuple[list[Example], list[str]]:
    """Examples of ``tasks`` (specs: names, 'pretrain', 'all45') and ``splits``, from a
    ``cappy data prepare`` folder or, without one, straight from the task catalog (vendored, cached).
    Returns ``(examples, task names)``; a task with too few examples is skipped (logged)."""
    from cappy_core.data.bigbench import TooFewExamples
    from cappy_core.data.catalog import TaskCatalog
    from cappy_core.data.records import read_examples, split_path
    from cappy_core.data.tasks import resolve_tasks

    if examples_dir:
        root = Path(examples_dir).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"--examples {root}: no such folder (write it with `cappy data prepare`)")
        available = sorted(p.name for p in root.iterdir() if (p / f"{splits[0]}.parquet").is_file())
        names, unavailable = resolve_tasks(tasks, available)
    else:
        catalog = TaskCatalog.open(cache_dir)
        names, unavailable = catalog.resolve(tasks)
    for why in unavailable.values():
        log(f"unavailable: {why}")
    examples: list[Example] = []
    used: list[str] = []
    for name in names:
        if examples_dir:
            for s in splits:
                path = split_path(examples_dir, name, s)
                if not path.is_file():
                    raise FileNotFoundError(f"{path}: missing; run `cappy data prepare --tasks {name} "
                                            f"--out {examples_dir}`")
                examples.extend(read_examples(path))
        else:
            try:
                parts = catalog.load(name)
            except TooFewExamples as e:
                log(f"skipped {name}: {e}")
                continue
            for s in splits:
                examples.extend(parts[s])
        used.append(name)
    return examples, used


# --- pairs from examples ---------------------------------------------------------------------

def _choice_pairs(ex: Example, cands: Sequence[tuple[str, float]], max_wrong: int | None,
                  rng: random.Random) -> list[LabeledPair]:
    scores = [float(s) for s in ex.choice_scores]
    if len(scores) != len(ex.choices):
        raise ValueError(f"{ex.task} {ex.split} example {ex.example_idx}: "
                         f"{len(ex.choices)} choices but {len(scores)} choice_scores")
    if not scores or max(scores) == min(scores):
        return []
    best = max(scores)
    labelled: dict[str, float] = {}
    for choice, s in zip(ex.choices, scores):
        labelled.setdefault(choice, 1.0 if s == best else 0.0)
    wrong = [c for c, y in labelled.items() if y == 0.0]
    if max_wrong is not None and len(wrong) > max_wrong:
        keep = set(rng.sample(wrong, max_wrong))
        labelled = {c: y for c, y in labelled.items() if y == 1.0 or c in keep}
    out = [LabeledPair(ex.instruction, c, y, "choice", ex.task) for c, y in labelled.items()]
    for text, label in cands:
        if text not in labelled:
            labelled[text] = label
            out.append(LabeledPair(ex.instruction, text, float(label), "candidate", ex.task))
    return out


def example_pairs(examples: Sequence[Example], candidates: CandidateIndex | None = None, *,
                  max_wrong_choices: int | None = None, seed: int = 0) -> list[LabeledPair]:
    """All labelled pairs of ``examples`` (choices, references, negatives, candidates), per the
    module docstring. Negatives are drawn within each task; ``max_wrong_choices`` keeps at most
    that many (random) wrong choices per multiple-choice example. Order: by task (sorted), choice
    pairs in example order, then what :func:`build_training_pairs` returns (already shuffled)."""
    rng = random.Random(seed)
    by_task: dict[str, list[Example]] = {}
    for ex in examples:
        by_task.setdefault(ex.task, []).append(ex)
    out: list[LabeledPair] = []
    for t, task in enumerate(sorted(by_task)):
        gen = []
        for ex in by_task[task]:
            cands = candidates.for_example(ex) if candidates is not None else []
            if ex.is_multiple_choice:
                out.extend(_choice_pairs(ex, cands, max_wrong_choices, rng))
            elif ex.references or cands:
                gen.append((ex, cands))
        if gen:
            out.extend(build_training_pairs(
                [ex.task for ex, _ in gen], [ex.instruction for ex, _ in gen],
                [list(ex.references) for ex, _ in gen],
                [[c for c, _ in cs] for _, cs in gen], [[lab for _, lab in cs] for _, cs in gen],
                train_size=None, seed=seed * 1_000_003 + t))
    return out


def _group_by_instruction(pairs: Sequence[LabeledPair]) -> dict[str, list[LabeledPair]]:
    groups: dict[str, list[LabeledPair]] = {}
    for p in pairs:
        groups.setdefault(p.instruction, []).append(p)
    return groups


def cap_per_task(pairs: Sequence[LabeledPair], max_pairs_per_task: int | None,
                 rng: random.Random) -> list[LabeledPair]:
    """Rule 1 of the module docstring: at most ``max_pairs_per_task`` pairs per task, taking
    shuffled instructions whole. ``None`` keeps everything."""
    if max_pairs_per_task is None:
        return list(pairs)
    if max_pairs_per_task < 1:
        raise ValueError(f"max_pairs_per_task must be >= 1 or None, got {max_pairs_per_task}")
    by_task: dict[str, list[LabeledPair]] = {}
    for p in pairs:
        by_task.setdefault(p.task, []).append(p)
    out: list[LabeledPair] = []
    for task in sorted(by_task):
        groups = list(_group_by_instruction(by_task[task]).values())
        rng.shuffle(groups)
        taken = 0
        for g in groups:
            if taken and taken + len(g) > max_pairs_per_task:
                break
            out.extend(g)
            taken += len(g)
    return out


def split_by_instruction(pairs: Sequence[LabeledPair], eval_size: int,
                         rng: random.Random) -> tuple[list[LabeledPair], list[LabeledPair]]:
    """Rule 2: ``(train, eval)`` with whole instructions moved to eval until it has
    ``eval_size`` pairs; at least one instruction stays in train."""
    if eval_size <= 0:
        return list(pairs), []
    groups = list(_group_by_instruction(pairs).values())
    if len(groups) < 2:
        raise ValueError(f"cannot hold out an eval slice by instruction: only {len(groups)} "
                         "distinct instruction(s); set eval_size to 0 or add data")
    rng.shuffle(groups)
    held, n = [], 0
    for g in groups[:-1]:
        if n >= eval_size:
            break
        held.append(g)
        n += len(g)
    train = [p for g in groups[len(held):] for p in g]
    return train, [p for g in held for p in g]


def tile(pairs: Sequence[LabeledPair], size: int | None) -> list[LabeledPair]:
    """Cut to ``size`` or repeat the whole list until ``size`` (``None``: unchanged)."""
    pairs = list(pairs)
    if size is None:
        return pairs
    if not pairs:
        raise ValueError(f"no pairs to cut or tile to train_size={size}")
    reps = -(-size // len(pairs))
    return (pairs * reps)[:size]


def build_pair_mixture(examples: Sequence[Example], candidates: CandidateIndex | None = None, *,
                       train_size: int | None, eval_size: int = 0,
                       max_pairs_per_task: int | None = None, max_wrong_choices: int | None = None,
                       seed: int = 0) -> tuple[list[LabeledPair], list[LabeledPair]]:
    """``(train, eval)`` labelled pairs: :func:`example_pairs`, then the three mixture rules of
    the module docstring. Raises ``ValueError`` when the examples give no pairs at all."""
    pairs = example_pairs(examples, candidates, max_wrong_choices=max_wrong_choices, seed=seed)
    if not pairs:
        tasks = sorted({e.task for e in examples})
        raise ValueError(f"no labelled pairs from {len(examples)} example(s) of task(s) {tasks[:10]}: "
                         "no references, no informative choices and no sampled candidates")
    rng = random.Random(seed)
    pairs = cap_per_task(pairs, max_pairs_per_task, rng)
    train, held = split_by_instruction(pairs, eval_size, rng)
    rng.shuffle(train)
    rng.shuffle(held)
    return tile(train, train_size), held
